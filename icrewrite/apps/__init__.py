"""Applications built on the library: ``demo`` (a model and its IC version compared on digits).

They use the public pieces (``train.compare``, ``deploy``, ``checkpoint``) and are what the
CLI commands of the same names run; nothing in the library imports them.
"""
