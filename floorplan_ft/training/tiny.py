"""Tiny offline tokenizers and causal LMs (no hub downloads) for tests and the CPU demo.

Nothing here is a useful language model: these are random weights that exercise the mechanics
(templates, constrained decoding, LoRA training steps) in seconds on a CPU.

`build_tiny_tokenizer` trains a byte-level BPE on a few Korean/English/JSON strings and wraps it in
`PreTrainedTokenizerFast` with a Qwen-style chat template (``<|im_start|>role ... <|im_end|>``,
honouring ``enable_thinking``). `build_tiny_causal_lm` saves a random 2-layer Qwen3 next to that
tokenizer. Byte-level means every string round-trips, so any Korean text can be encoded.
"""

from __future__ import annotations

from pathlib import Path

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", EOS_TOKEN, "<think>", "</think>"]

# Qwen3-like: `enable_thinking=False` pre-fills an empty think block, so a model trained on plain
# JSON answers sees the same prompt at training and serving time.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)

_CORPUS = [
    '{"image_name": "C01_0001.png", "structure_type": "판상형", "bay_count": 3, "total_spaces": 9}',
    '{"room_count": 3, "bathroom_count": 2, "balcony_ratio": 8.5, "windowless_ratio": 22.2}',
    '{"ventilation_quality": "우수", "summary": "3베이 판상형 평면으로 맞통풍이 가능합니다."}',
    '"spaces": [{"space_name": "거실", "space_type": "공통공간", "has_window": true, "features": []}]',
    '"connected_spaces": ["주방", "침실1"], "evaluation_comment": "채광이 좋습니다.", "area_m2": null',
    '"design_evaluation": {"채광": "우수", "환기": "양호", "가족융화": "보통", "수납": "미흡"}',
    '"compliance": {"overall_grade": "최우수", "compliant_items": [], "non_compliant_items": []}',
    '"recommendations": ["팬트리 추가"], "category": "수납", "item": "수납 비율", "reason": "부족"',
    "타워형 혼합형 불합격 안방 욕실 현관 발코니 드레스룸 다용도실 세대 내부 공간",
    "당신은 아파트 평면도를 분석하는 건축 전문가입니다. 다음 평면도를 분석해 JSON을 작성하세요.",
    "You are a floor-plan analyst. Answer with one JSON object and nothing else.",
    "system user assistant true false null 0 1 2 3 4 5 6 7 8 9 10 25.5 100",
]


def build_tiny_tokenizer(directory: str | Path, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer, save it (with chat template) to `directory`, return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    tokenizer.chat_template = CHAT_TEMPLATE
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_tiny_causal_lm(directory: str | Path, seed: int = 0, hidden_size: int = 32):
    """Save a random 2-layer Qwen3 and its tokenizer to `directory`; return (model, tokenizer)."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tiny_tokenizer(directory)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory)
    return model, tokenizer


def bias_towards_short_json(model, tokenizer, directory: str | Path | None = None):
    """Make a random tiny LM prefer closing tokens (``"`` > ``]`` > ``}``), so schema-constrained
    decoding ends in a few hundred tokens instead of filling every string to its maxLength.

    How: the residual branches are scaled to ~0 and embedding dimension 0 is set to a constant,
    so the final hidden state always points along dimension 0; the preferred tokens get a larger
    value there, hence a larger logit (embeddings are tied). Saves to `directory` if given.
    """
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.01)
            layer.mlp.down_proj.weight.mul_(0.01)
        embeddings = model.get_input_embeddings().weight
        embeddings[:, 0] = 4.0
        for boost, token in ((3.0, '"'), (2.0, "]"), (1.0, "}")):
            embeddings[tokenizer.convert_tokens_to_ids(token), 0] = 4.0 + boost
    if directory is not None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return model


def ensure_demo_base(path: str | Path, *, seed: int = 0, short_json: bool = True) -> str:
    """The demo's tiny student base (a random 2-layer Qwen3 + byte-level tokenizer), built once.
    ``short_json`` biases it towards closing JSON early so its constrained answers stay short."""
    path = Path(path)
    if not (path / "config.json").is_file():
        model, tokenizer = build_tiny_causal_lm(path, seed=seed)
        if short_json:
            bias_towards_short_json(model, tokenizer, path)
    return str(path)
