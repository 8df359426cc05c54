"""The commands that are not a Trainer loop, each a subpackage of its own (``python -m lit_transfusion <name>``).

A command may import the method (``lit_transfusion.*``), the callbacks and the datamodules; nothing outside this
package imports a command, except ``lit_transfusion.cli``'s entry point (by name) and the tests.
"""
