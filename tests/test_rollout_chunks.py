"""Rollouts generated in chunks of prompts equal one generate call over the whole batch; the continuous
engine's stream of chunks draws the samples of the static sampler's chunk-by-chunk calls."""

import types

import numpy as np
from flax import nnx

import hf_utils as H
from papo_jax import models
from papo_jax.rollouts import prompt_chunks, sample_texts
from papo_jax.sampling import ContinuousEngine, EngineConfig, Sampler, SamplingConfig

ROWS = [[5, "img", 7], [3, "img", 4], [12], [2, "img", 3, "img", 1]]
GRIDS = [(1, 10, 14), (1, 8, 8), (1, 4, 8), (1, 8, 4)]
COUNTS = [1, 1, 0, 2]


class _Tok:
  def decode(self, ids, skip_special_tokens=False):
    return " ".join(map(str, ids))


def _batch():
  ids, mask, pv, grid = H.make_batch(ROWS, GRIDS, seed=2)
  return types.SimpleNamespace(input_ids=np.asarray(ids), attention_mask=np.asarray(mask), pixel_values=np.asarray(pv),
                               image_grid_thw=np.asarray(grid), image_counts=np.asarray(COUNTS), num_images=4)


def test_prompt_chunks_cut_pixels_by_image_counts():
  b = _batch()
  chunks = prompt_chunks(b, 2)
  patches = [int(np.prod(g)) for g in GRIDS]
  assert len(chunks) == 2 and all(c[2].shape == chunks[0][2].shape for c in chunks)
  np.testing.assert_array_equal(chunks[0][2][:patches[0] + patches[1]], b.pixel_values[:patches[0] + patches[1]])
  np.testing.assert_array_equal(chunks[1][2][:patches[2] + patches[3]], b.pixel_values[patches[0] + patches[1]:])
  assert not chunks[1][2][patches[2] + patches[3]:].any()
  np.testing.assert_array_equal(chunks[1][3][:2], np.asarray(GRIDS[2:]))
  np.testing.assert_array_equal(chunks[1][0], b.input_ids[2:])
  assert len(prompt_chunks(b, 0)) == 1 and len(prompt_chunks(b, 4)) == 1


def test_chunked_greedy_rollout_equals_unchunked():
  model = models.init_model(models.from_hf_dict(H.tiny_hf_config(tie=False).to_dict(), dtype="float32")
                            .replace(hf_dict=None), seed=3)
  graphdef, state = nnx.split(model)
  sampler = Sampler(graphdef, SamplingConfig(max_new_tokens=6, greedy=True, cache_dtype="float32",
                                             stop_token_ids=(H.tiny_hf_config().text_config.vocab_size - 1,)))
  b = _batch()
  kw = dict(n=2, key=0, tokenizer=_Tok(), stop_ids=())
  whole = sample_texts(sampler, state, b, **kw)
  assert len(set(whole[2])) > 1   # rows differ, so a misplaced row or image would show
  for chunk in (1, 3):             # one prompt per call; an uneven last chunk
    toks, mask, texts = sample_texts(sampler, state, b, chunk_prompts=chunk, **kw)
    np.testing.assert_array_equal(toks, whole[0])
    np.testing.assert_array_equal(mask, whole[1])
    assert texts == whole[2]


def test_engine_stream_of_chunks_equals_static_chunk_by_chunk():
  """Sampled (the per-chunk key rule matters), 2 slots: samples of different chunks share the slots."""
  model = models.init_model(models.from_hf_dict(H.tiny_hf_config(tie=False).to_dict(), dtype="float32")
                            .replace(hf_dict=None), seed=3)
  graphdef, state = nnx.split(model)
  cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, cache_dtype="float32", stop_token_ids=(5, 9))
  b = _batch()
  kw = dict(n=2, key=0, tokenizer=_Tok(), stop_ids=())
  engine = ContinuousEngine(graphdef, cfg, EngineConfig(num_slots=2, page_size=4, num_pages=64, prefill_chunk=8))
  for chunk in (0, 1, 3):
    want = sample_texts(Sampler(graphdef, cfg), state, b, chunk_prompts=chunk, **kw)
    got = sample_texts(engine, state, b, chunk_prompts=chunk, **kw)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[2] == want[2]
    assert len(set(got[1].sum(1).tolist())) > 1, "rows of one length would not test the scheduling"
  whole = sample_texts(engine, state, b, **kw)[0]
  assert (whole != got[0]).any(), "chunks draw from keys of their own"
