"""The commands and the experiment tooling: the top layer (``python -m lit_transfusion <command>``, see ``main.py``).

A command may import the method (``lit_transfusion.*``), the callbacks and the datamodules, directly; nothing below
imports a command (``tests/test_layers.py`` checks it).
"""
