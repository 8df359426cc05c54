"""Embedded "shapes world" data: procedurally rendered GenEval-style prompts, scenes and text."""

from .transfusion import ShapesDataModule  # noqa: F401
from .world import (
    BACKGROUND,
    COLORS,
    FAMILIES,
    RELATIONS,
    SHAPES,
    SPLITS,
    TEMPLATES,
    Item,
    Obj,
    Prompt,
    Sample,
    Scene,
    ShapesWorld,
    caption,
    describe,
    relations_between,
    render,
    sample_prompt,
    sample_scene,
    scene_caption,
)

__all__ = [
    "BACKGROUND", "COLORS", "FAMILIES", "RELATIONS", "SHAPES", "SPLITS", "TEMPLATES",
    "Item", "Obj", "Prompt", "Sample", "Scene", "ShapesWorld",
    "caption", "describe", "relations_between", "render", "sample_prompt", "sample_scene", "scene_caption",
]
