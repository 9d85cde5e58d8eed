"""Data path: records → Qwen-VL processor → masked copies → bucketed PromptBatches.

  processor.py      Qwen2.5-VL / Qwen3-VL processor (numpy + PIL), HF-identical outputs
  images.py         image bytes → uint8 RGB (modes, alpha, 16-bit, corrupt files)
  masking.py        PAPO's masked image (raw 14-px squares) and aligned variants
  sources.py        parquet / JSON lines / HF datasets dir / synthetic record sources
  synthetic.py      procedurally drawn shapes task with verifiable answers
  pipeline.py       grain pipeline, PromptBatch, buckets, checkpointable iterator
  tiny_tokenizer.py tiny Qwen-style tokenizer + processor files (tests, CPU demo)
  decode.py         sampled token ids -> response text
  testing.py        writers of small real data files (tests, bench)
  bench.py          `python -m papo_jax.data.bench`: records/s at Qwen2.5-VL sizes
"""

from papo_jax.data.decode import decode_responses
from papo_jax.data.masking import MaskConfig
from papo_jax.data.pipeline import DataConfig
from papo_jax.data.pipeline import make_iterator
from papo_jax.data.pipeline import PromptBatch
from papo_jax.data.pipeline import PromptBatchIterator
from papo_jax.data.processor import Processor
from papo_jax.data.tiny_tokenizer import build_tiny_checkpoint_files
