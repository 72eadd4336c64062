"""The paged latent cache end to end (contract v2): Batch layout over block tables, mixed decode + prefill batches
equal separate forwards, generation independent of the block size, blocks given back, block sizes chosen from the
backend's manifest."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core import registry
from core.backend import CacheSpec, Manifest, choose_block_size
from core.batch import Batch, PagedCache
from core.default_model import load_default
from core.errors import ContractError, UserError
from core.generate import Generator
from tests.helpers import fresh_seed, load_ours

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    return load_ours(load_default(), torch.float32, with_mtp=True)


def test_batch_slots_and_keys_follow_the_block_tables():
    tables = [[7, 2], [5], [0, 3, 6]]
    b = Batch.build([[11], [12, 13, 14], [15, 16]], tables, [5, 0, 9], CPU, block_size=4, num_decode=1)
    # decode sequence 0 writes position 5 -> block 2 row 1; prefill 1 writes 0..2 in block 5; prefill 2 writes
    # positions 9, 10 -> its third block (6), rows 1 and 2
    assert b.slot_mapping.tolist() == [2 * 4 + 1, 20, 21, 22, 6 * 4 + 1, 6 * 4 + 2]
    assert b.positions.tolist() == [5, 0, 1, 2, 9, 10]
    assert b.key_slots.tolist() == [20, 21, 22] + [0, 1, 2, 3, 12, 13, 14, 15, 24, 25, 26]
    assert b.prefill_cu_q.tolist() == [0, 3, 5] and b.prefill_cu_k.tolist() == [0, 3, 14]
    assert b.block_table.dtype == torch.int32 and b.block_table.tolist() == [[7, 2, -1], [5, -1, -1], [0, 3, 6]]
    assert (b.num_decode, b.new_per_seq, b.num_decode_tokens, b.decode) == (1, 1, 1, False)
    with pytest.raises(ValueError, match="needs 6 positions"):
        Batch.build([[1]], [[0]], [5], CPU, block_size=4, decode=True)
    with pytest.raises(ValueError, match="same number of tokens"):
        Batch.build([[1], [2, 3]], [[0], [1]], [0, 0], CPU, block_size=4, decode=True)


def _poisoned_cache(model, blocks: int, block_size: int) -> PagedCache:
    cache = model.new_cache(blocks, block_size)
    for layer in cache.layers:
        layer.fill_(float("nan"))  # never-written rows and unused blocks must not leak into any output
    return cache


@pytest.mark.parametrize("s_new", [1, 2])
def test_mixed_batch_equals_separate_prefill_and_decode_forwards(model, s_new):
    """Decodes of two sequences + a fresh prefill + a prefill chunk after a cached prefix, in ONE forward, equal the
    decode forward and the prefill forward run separately (float32, tight), hidden states and cache writes."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    vocab, bs = model.cfg.vocab_size, 4
    tok = lambda n: torch.randint(2, vocab, (n,), generator=g).tolist()  # noqa: E731
    prefix = {0: tok(9), 1: tok(3), 3: tok(6)}  # sequences 0, 1 decode; 2 is fresh; 3 continues its prefill
    new = {0: tok(s_new), 1: tok(s_new), 2: tok(7), 3: tok(5)}
    final = {b: len(prefix.get(b, [])) + len(new[b]) for b in new}
    order = torch.randperm(sum(-(-n // bs) for n in final.values()) + 3, generator=g).tolist()
    tables, start = {}, 0
    for b, n in final.items():
        k = -(-n // bs)
        tables[b], start = order[start:start + k], start + k
    cache = _poisoned_cache(model, len(order), bs)
    with torch.no_grad():
        seqs = sorted(prefix)
        model.forward(Batch.build([prefix[b] for b in seqs], [tables[b] for b in seqs], [0] * len(seqs), CPU,
                                  block_size=bs), cache)
        before = [t.clone() for t in cache.layers]
        starts = {b: len(prefix.get(b, [])) for b in new}
        mixed = model.forward(Batch.build([new[b] for b in (0, 1, 2, 3)], [tables[b] for b in (0, 1, 2, 3)],
                                          [starts[b] for b in (0, 1, 2, 3)], CPU, block_size=bs, num_decode=2), cache)
        after_mixed = [t.clone() for t in cache.layers]
        for t, saved in zip(cache.layers, before):
            t.copy_(saved)
        dec = model.forward(Batch.build([new[0], new[1]], [tables[0], tables[1]], [starts[0], starts[1]], CPU,
                                        block_size=bs, decode=True), cache)
        pre = model.forward(Batch.build([new[2], new[3]], [tables[2], tables[3]], [starts[2], starts[3]], CPU,
                                        block_size=bs), cache)
    assert not mixed.isnan().any(), f"seed {seed}: a poisoned row leaked"
    torch.testing.assert_close(mixed, torch.cat([dec, pre]), rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    for a, b in zip(after_mixed, cache.layers):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True, msg=f"seed {seed}: cache writes")


def test_generation_does_not_depend_on_the_block_size_and_frees_every_block(model):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 1)]
    runs, new = {}, 6
    for bs, mtp in ((1, False), (16, False), (4, True)):
        gen = Generator(model, prefill_chunk=7, block_size=bs)
        runs[bs, mtp] = gen.generate(prompts, new, mtp=mtp, stop_at_eos=False)
        pool = gen.paging.pool
        assert pool.num_used == 0 and not gen.paging.tables, "blocks go back when sequences end"
        need = sum(-(-(len(p) + new + 2) // bs) for p in prompts)
        assert pool.num_blocks <= need, "the pool grows from the prompts' size, never past v1's reservation"
    outs = {k: r.output_ids for k, r in runs.items()}
    assert len({str(v) for v in outs.values()}) == 1, f"seed {seed}: {outs}"


def test_nothing_is_reserved_for_max_new_tokens_up_front(model):
    """A 20-token prompt with max_new_tokens 160000 starts with 2 blocks of 16 (v1 reserved 160022 positions)."""
    paging = Generator(model, block_size=16).new_paging([[3] * 20], 160000)
    assert paging.pool.num_blocks == 2 and paging.caches[0].num_blocks == 2
    table = paging.reserve(0, 40)  # growth: a quarter or what is short, whichever is more
    assert len(table) == 3 and paging.pool.num_blocks == 3 and paging.caches[0].num_blocks == 3
    paging.release(0)
    assert paging.pool.num_used == 0


def test_block_size_comes_from_the_manifest():
    ref = registry.load("cpu_ref")
    assert ref.manifest.cache.block_sizes is None
    assert choose_block_size(ref, 3) == 3 and choose_block_size(ref, None) == 16
    limited = dataclasses.replace(ref, manifest=dataclasses.replace(ref.manifest, cache=CacheSpec((64, 128), 128)))
    assert choose_block_size(limited, None) == 128 and choose_block_size(limited, 64) == 64
    with pytest.raises(UserError, match=r"--block-size 16: backend cpu_ref takes block sizes 64, 128"):
        choose_block_size(limited, 16)
    assert CacheSpec((32, 64)).default() == 32


@pytest.mark.parametrize("cache, message", [
    ("{block_sizes: [0, 16]}", "positive ints"),
    ("{block_sizes: []}", "non-empty"),
    ("{block_sizes: some}", "positive ints"),
    ("{block_sizes: [16], preferred: 64}", "preferred 64"),
    ("{sizes: [16]}", "'cache' must be a mapping"),
])
def test_manifest_cache_entry_is_validated(tmp_path, cache, message):
    path = tmp_path / "manifest.yaml"
    path.write_text(f"backend: x\noperators:\n  rms_norm: {{dtypes: [float32]}}\ncache: {cache}\n")
    with pytest.raises(ContractError, match=message):
        Manifest.load(path)
