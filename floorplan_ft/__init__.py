"""ft-pipeline's domain code (no Prefect imports here: see ARCHITECTURE.md)."""

import logging

# bitsandbytes (QLoRA) warns at import, on CPUs with AVX512-BF16, that an optional kernel could not
# be fetched from the Hugging Face hub ("Failed to load CPU gemm_4bit_forward from kernels-community").
# Its own CPU kernels are used instead, and nothing here downloads at run time, so that warning only
# alarms: keep that one logger to errors.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
