"""Build a teacher by name from the settings."""

from __future__ import annotations

from floorplan_ft.settings import Settings
from floorplan_ft.teachers.labeling import LLMTeacher, ReferenceTeacher, Teacher

TEACHER_NAMES = ("openai", "gemini", "compatible", "local", "reference")


def teacher_model(settings: Settings, name: str) -> str:
    t = settings.teachers
    return {
        "openai": t.openai_model,
        "gemini": t.gemini_model,
        "compatible": t.compatible_model or "",
        "local": t.local_model_path or "",
        "reference": ReferenceTeacher.model,
    }[name]


def make_teacher(settings: Settings, name: str) -> Teacher:
    """A teacher ready to label; missing keys or servers fail here, before any money is spent."""
    from floorplan_ft.providers.factory import make_chat_client

    t = settings.teachers
    if name == "reference":
        return ReferenceTeacher()
    if name == "openai":
        client = make_chat_client(settings, provider="openai", model=t.openai_model, timeout_s=t.request_timeout_s)
    elif name == "gemini":
        client = make_chat_client(settings, provider="gemini", model=t.gemini_model, timeout_s=t.request_timeout_s)
    elif name == "compatible":
        if not (t.compatible_base_url and t.compatible_model):
            from floorplan_ft.providers.base import ConfigError

            raise ConfigError("teacher 'compatible' needs teachers.compatible_base_url and teachers.compatible_model")
        client = make_chat_client(
            settings,
            provider="openai-compatible",
            model=t.compatible_model,
            base_url=t.compatible_base_url,
            timeout_s=t.request_timeout_s,
        )
    elif name == "local":
        if not t.local_model_path:
            from floorplan_ft.providers.base import ConfigError

            raise ConfigError("teacher 'local' needs teachers.local_model_path (a model directory)")
        client = make_chat_client(settings, provider="local", model=t.local_model_path, max_tokens=t.max_output_tokens)
    elif name == "production":
        raise ValueError(
            "setting teachers.teachers: 'production' is the team's imported answer set (ft-pipeline import "
            "analyses), never labeled in phase 3: list it in quality.extra_teachers instead"
        )
    else:
        raise ValueError(
            f"setting teachers.teachers: unknown teacher {name!r} (choose from {', '.join(TEACHER_NAMES)})"
        )
    return LLMTeacher(name, client, t.temperature)
