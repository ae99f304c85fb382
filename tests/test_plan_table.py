"""The plan as a table and as data (icrewrite.rewrite._plan): printing and JSON."""
from __future__ import annotations

import json

import icrewrite

from nets import timm_model


def test_plan_is_printable_and_json_serialisable():
    plan = icrewrite.plan(timm_model("resnet18"))
    text = str(plan)
    assert "insert-ic" in text and "layer1.0.conv2" in text and "stem: reads the model input" in text
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["param_delta"] == plan.param_delta == sum(e["param_delta"] for e in data["edits"])
