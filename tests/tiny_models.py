"""The tests build their tiny models with the package's own builder."""

from floorplan_ft.training.tiny import (  # noqa: F401
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    bias_towards_short_json,
    build_tiny_causal_lm,
    build_tiny_tokenizer,
)
