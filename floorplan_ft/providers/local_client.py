"""The student in-process: a transformers causal LM (merged weights or a LoRA adapter directory).

Loading is lazy: the first call (or `load()`) reads the weights, so building the client is cheap
and a service can start before the model is needed. Generation is greedy and serialised by a lock
(one model, one device). With a schema, decoding is constrained by xgrammar so the output is JSON of
that schema: Outlines' default backend refused the Korean enum values and its llguidance/xgrammar
backends let weak models pad with whitespace (STACK.md), so xgrammar is used directly with
``any_whitespace=False``. xgrammar's bounded-string rule has no escapes, so the student cannot
write ``\\n`` or ``\\"`` inside a length-limited string; it can emit raw control characters,
which are dropped before parsing.

A generation can be stopped: `achat` gives each call a cancel flag that a transformers
`StoppingCriteria` reads after every decoded token, so when the awaiting task is cancelled (the
service's ``serving.timeout_s``, a shutdown) the worker thread ends within one step and the model is
free for the next request (a thread cannot be killed; this is how it is made to stop). `cancel_all`
sets every live flag (SIGTERM). A prompt that does not fit the model's context together with the
output budget is refused before any decoding (`PromptTooLong`), since the prefill of a huge prompt
is one forward pass that nothing can interrupt.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from floorplan_ft.providers.base import (
    BadRequest,
    ChatResult,
    ConfigError,
    LLMClient,
    LLMError,
    Messages,
    OutputTruncated,
    Usage,
    parse_structured,
    strip_thinking,
)

log = logging.getLogger(__name__)

XGRAMMAR_PIN = "xgrammar==0.2.8"
# xgrammar's length-bounded JSON strings admit raw control characters (a weak model emits NULs).
# With any_whitespace=False no control character can be legitimate in the constrained output.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")
# How long a cancelled `achat` waits for its worker to notice (normally one decoding step).
CANCEL_WAIT_S = 10.0


class PromptTooLong(BadRequest):
    """The prompt plus the output budget does not fit the model's context window."""

    retryable = False

    def __init__(self, message: str, *, prompt_tokens: int, max_tokens: int, context: int, **kw: Any):
        super().__init__(message, **kw)
        self.prompt_tokens, self.max_tokens, self.context = prompt_tokens, max_tokens, context


class GenerationCancelled(LLMError):
    """The generation was stopped by its cancel flag (its request timed out, or a shutdown)."""

    retryable = True


def _cancel_criteria(flag: threading.Event) -> Any:
    """A transformers `StoppingCriteria` that stops every sequence once `flag` is set (read after
    each decoded token)."""
    import torch
    from transformers import StoppingCriteria

    class CancelFlag(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), flag.is_set(), dtype=torch.bool, device=input_ids.device)

    return CancelFlag()


class LocalChatClient(LLMClient):
    """`model_path`: a directory with full weights (config.json) or a LoRA adapter
    (adapter_config.json naming its base, loaded as base + `peft.PeftModel`)."""

    provider = "local"

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = "auto",
        load_in_4bit: bool = False,
        max_new_tokens: int = 3072,
        enable_thinking: bool = False,
        path_setting: str = "serving.adapter_path",
        cpu_threads: int | None = None,
    ):
        path = Path(model_path)
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ConfigError(
                f"{path} holds no model (config.json) or LoRA adapter (adapter_config.json); "
                f"set {path_setting} to a trained student directory",
                provider=self.provider,
            )
        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, not {device!r}", provider=self.provider)
        self.model = str(path)
        self.model_path = path
        self.requested_device = device
        self.cpu_threads = cpu_threads
        self.load_in_4bit = load_in_4bit
        self.max_new_tokens = max_new_tokens
        self.enable_thinking = enable_thinking
        self._lock = threading.RLock()
        self._model: Any = None
        self._tokenizer: Any = None
        self._device: str | None = None
        self._stop_ids: list[int] = []
        self._compiler: Any = None
        self._grammars: dict[str, Any] = {}
        # Cancel flags of the calls under way or waiting for the model; counters for health/tests.
        self._flags: set[threading.Event] = set()
        self._flags_lock = threading.Lock()
        self.generating = False
        self.cancelled_generations = 0
        if importlib.util.find_spec("xgrammar") is None:
            log.warning(
                "xgrammar is not installed: structured answers will fail (pip install %s)",
                XGRAMMAR_PIN,
            )

    # ------------------------------------------------------------------------------ loading

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Read tokenizer and weights now (otherwise the first call does)."""
        with self._lock:
            if self._model is None:
                self._load_locked()

    def _load_locked(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = self.requested_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but CUDA is not available", provider=self.provider)
        if device == "cpu" and self.cpu_threads:
            # Small models on a busy CPU run many times faster on one thread (less contention).
            torch.set_num_threads(self.cpu_threads)
        adapter_file = self.model_path / "adapter_config.json"
        is_adapter = adapter_file.is_file() and not (self.model_path / "config.json").is_file()
        base = self.model_path
        if is_adapter:
            base = json.loads(adapter_file.read_text())["base_model_name_or_path"]
        kwargs: dict[str, Any] = {"dtype": torch.float32}
        if device == "cuda":
            kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if self.load_in_4bit and device == "cuda":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=kwargs["dtype"],
                bnb_4bit_use_double_quant=True,
            )
            kwargs["device_map"] = {"": 0}
        elif self.load_in_4bit:
            log.warning("load_in_4bit needs CUDA; loading %s unquantised on %s", self.model, device)
        try:
            model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
            if is_adapter:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, self.model_path)
            tokenizer_dir = self.model_path if _has_tokenizer(self.model_path) else base
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the model from {self.model_path}: {exc}", provider=self.provider) from None
        if "device_map" not in kwargs:
            model.to(device)
        model.eval()
        stop = model.generation_config.eos_token_id if model.generation_config else None
        stop_ids = [stop] if isinstance(stop, int) else list(stop or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop_ids:
            stop_ids.append(tokenizer.eos_token_id)
        if not stop_ids:
            raise ConfigError(f"{self.model_path}: the tokenizer has no eos token", provider=self.provider)
        self._model, self._tokenizer, self._device, self._stop_ids = (
            model,
            tokenizer,
            device,
            stop_ids,
        )

    def _grammar(self, schema: type[BaseModel]) -> Any:
        """Compiled once per schema (and per tokenizer, i.e. per client)."""
        # Property order matters: the grammar emits keys in the schema's order, as in training data.
        schema_json = json.dumps(schema.model_json_schema(), ensure_ascii=False)
        compiled = self._grammars.get(schema_json)
        if compiled is None:
            try:
                import xgrammar as xgr
            except ImportError:
                raise ConfigError(
                    f"constrained decoding needs xgrammar: pip install {XGRAMMAR_PIN}",
                    provider=self.provider,
                ) from None
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer,
                    vocab_size=self._model.config.vocab_size,
                    stop_token_ids=self._stop_ids,
                )
                self._compiler = xgr.GrammarCompiler(info)
            compiled = self._compiler.compile_json_schema(schema_json, any_whitespace=False)
            self._grammars[schema_json] = compiled
        return compiled

    # ------------------------------------------------------------------------------ calls

    async def achat(
        self,
        messages: Messages,
        schema: type[BaseModel] | None = None,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatResult:
        """Greedy decoding in a worker thread; `temperature` is ignored. Cancelling the awaiting
        task stops the decoding (within one token) and returns once the worker is done."""
        flag = threading.Event()
        worker = asyncio.ensure_future(asyncio.to_thread(self._generate, messages, schema, max_tokens, flag))
        try:
            return await asyncio.shield(worker)
        except asyncio.CancelledError:
            flag.set()
            # Wait (shielded) for the thread to leave the model, so the next request finds it free.
            done, _ = await asyncio.wait({worker}, timeout=CANCEL_WAIT_S)
            if not done:
                log.warning("a cancelled generation did not stop within %g s", CANCEL_WAIT_S)
            elif not worker.cancelled():
                worker.exception()  # retrieved: its GenerationCancelled is expected
            raise

    def chat(
        self,
        messages: Messages,
        schema: type[BaseModel] | None = None,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatResult:
        return self._generate(messages, schema, max_tokens)

    def cancel_all(self) -> int:
        """Stop every generation under way or waiting for the model (thread-safe; a shutdown).
        Returns how many were flagged."""
        with self._flags_lock:
            flags = list(self._flags)
        for flag in flags:
            flag.set()
        return len(flags)

    def _generate(
        self,
        messages: Messages,
        schema: type[BaseModel] | None,
        max_tokens: int | None,
        cancel: threading.Event | None = None,
    ) -> ChatResult:
        cancel = cancel or threading.Event()
        with self._flags_lock:
            self._flags.add(cancel)
        try:
            return self._generate_flagged(messages, schema, max_tokens, cancel)
        finally:
            with self._flags_lock:
                self._flags.discard(cancel)

    def _cancelled(self) -> GenerationCancelled:
        self.cancelled_generations += 1
        return GenerationCancelled(
            "the generation was cancelled (its request timed out or the service is stopping)",
            provider=self.provider,
            model=self.model,
        )

    def _generate_flagged(
        self,
        messages: Messages,
        schema: type[BaseModel] | None,
        max_tokens: int | None,
        cancel: threading.Event,
    ) -> ChatResult:
        limit = max_tokens or self.max_new_tokens
        with self._lock:
            if cancel.is_set():  # cancelled while it waited for the model
                raise self._cancelled()
            # Imports under the lock: transformers' lazy module is not safe to import from several
            # threads at once ("cannot import name ..." under concurrent first use).
            import torch
            from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

            if self._model is None:
                self._load_locked()
            tokenizer, model = self._tokenizer, self._model
            if not getattr(tokenizer, "chat_template", None):
                raise ConfigError(f"the tokenizer of {self.model} has no chat template", provider=self.provider)
            # Templates that know `enable_thinking` (Qwen3) honour it; others ignore the variable.
            prompt = tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=True,
                tokenize=False,
                enable_thinking=self.enable_thinking,
            )
            encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self._device)
            prompt_tokens = int(encoded["input_ids"].shape[1])
            context = self.context_window
            if context is not None and prompt_tokens + limit > context:
                raise PromptTooLong(
                    f"the prompt is {prompt_tokens} tokens; with an output budget of {limit} tokens "
                    f"it does not fit the model's context of {context} tokens (send a smaller "
                    "topology, or lower serving.max_new_tokens)",
                    prompt_tokens=prompt_tokens,
                    max_tokens=limit,
                    context=context,
                    provider=self.provider,
                    model=self.model,
                )
            processors = LogitsProcessorList()
            if schema is not None:
                import xgrammar as xgr

                processors.append(xgr.contrib.hf.LogitsProcessor(self._grammar(schema)))  # one per call
            config = GenerationConfig(
                max_new_tokens=limit,
                do_sample=False,
                eos_token_id=self._stop_ids,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self._stop_ids[0],
            )
            started = time.perf_counter()
            self.generating = True
            try:
                with torch.inference_mode():
                    output = model.generate(
                        **encoded,
                        generation_config=config,
                        logits_processor=processors,
                        stopping_criteria=StoppingCriteriaList([_cancel_criteria(cancel)]),
                    )
            finally:
                self.generating = False
            latency = time.perf_counter() - started
            if cancel.is_set():
                raise self._cancelled()
        prompt_len = encoded["input_ids"].shape[1]
        new_tokens = output[0, prompt_len:].tolist()
        finished = bool(new_tokens) and new_tokens[-1] in self._stop_ids
        text = tokenizer.decode(new_tokens, skip_special_tokens=True)
        usage = Usage(input_tokens=prompt_len, output_tokens=len(new_tokens), latency_s=latency)
        kw = {"provider": self.provider, "model": self.model}
        try:
            if not finished and len(new_tokens) >= limit:
                raise OutputTruncated(f"the answer hit max_new_tokens={limit}", text=text, **kw)
            text = strip_thinking(text)
            parsed = None
            if schema is not None:
                text = _CONTROL_CHARS.sub("", text)
                parsed = parse_structured(text, schema, **kw)
        except LLMError as exc:
            exc.usage = usage
            raise
        return ChatResult(
            text=text,
            parsed=parsed,
            usage=usage,
            model=self.model,
            provider=self.provider,
            finish_reason="stop" if finished else "length",
        )

    @property
    def context_window(self) -> int | None:
        """The loaded model's context length (``max_position_embeddings``), if it says."""
        config = getattr(self._model, "config", None)
        value = getattr(config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) and value > 0 else None

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "device": self._device or self.requested_device,
            "load_in_4bit": self.load_in_4bit,
            "constrained_decoding": "xgrammar",
        }

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        self.cancel_all()
        # Bounded: a generation that cannot stop (a prefill) must not hold a shutdown forever.
        locked = self._lock.acquire(timeout=CANCEL_WAIT_S)
        if not locked:
            log.warning("closing %s while a generation is still running", self.model)
        try:
            on_cuda = self._device == "cuda"
            self._model = self._tokenizer = self._compiler = None
            self._grammars.clear()
        finally:
            if locked:
                self._lock.release()
        if on_cuda:
            import torch

            torch.cuda.empty_cache()


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
