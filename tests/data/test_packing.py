"""Token files, packing with cu_seqlens, and the deterministic, resumable, world-size-free order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssmkit.data import TokenStream, WindowLoader, evaluation_batches, open_tokens, pack_windows, write_tokens


def _stream(n=1000, vocab=50, eos=None, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=n)
    if eos is not None:
        tokens[rng.random(n) < 0.1] = eos
    return TokenStream(tokens, vocab, eos)


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_token_files_round_trip_memory_mapped(tmp_path, suffix):
    stream = _stream(777, vocab=70000, eos=3)
    path = write_tokens(tmp_path / f"train{suffix}", stream)
    again = open_tokens(path)
    assert isinstance(again.tokens, np.memmap) or isinstance(again.tokens.base, np.memmap)
    assert again.tokens.dtype == np.uint32 and again.vocab_size == 70000 and again.eos_id == 3
    np.testing.assert_array_equal(np.asarray(again.tokens), stream.tokens)


def test_token_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_tokens(tmp_path / "missing.npy")
    raw = tmp_path / "raw.bin"
    np.arange(10, dtype=np.uint16).tofile(raw)
    with pytest.raises(ValueError, match="vocab_size of .* is unknown"):
        open_tokens(raw)
    with pytest.raises(ValueError, match="dtype of the raw token file"):
        open_tokens(raw, vocab_size=16)
    assert len(open_tokens(raw, vocab_size=16, dtype="uint16")) == 10
    with pytest.raises(ValueError, match=r"must end in \.npy or \.bin"):
        write_tokens(tmp_path / "x.txt", _stream(10))


def test_pack_windows_marks_windows_and_documents():
    eos = 9
    windows = np.array([[1, 2, eos, 3, 4, 5], [6, eos, 7, 8, 2, eos]])
    batch = pack_windows(windows, eos)
    assert batch.input_ids.shape == (1, 12)
    assert batch.cu_seqlens.tolist() == [0, 3, 6, 8, 12]
    assert batch.cu_seqlens.dtype == torch.int32
    # Targets: every position but the last of each segment.
    assert batch.num_targets == 12 - 4


def test_num_targets_matches_the_model_loss_mask():
    """The count used to weight micro-batches is the number of targets the model averages over."""
    from tests.training.toy import ToyLM

    batch = pack_windows(np.array([[1, 2, 9, 3, 4, 5], [6, 9, 7, 8, 2, 9]]), 9)
    model = ToyLM(vocab_size=10, d_model=4)
    out = model(batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens)
    # Recompute the summed loss over the kept targets: mean * count must equal it.
    seq = torch.searchsorted(batch.cu_seqlens[1:], torch.arange(12), right=True)
    kept = (seq[1:] == seq[:-1]).sum().item()
    assert kept == batch.num_targets
    assert torch.isfinite(out.loss)


def test_order_is_deterministic_and_resumable():
    stream = _stream(2000, eos=7)
    a = WindowLoader(stream, seq_len=16, micro_batch_size=3, grad_accum=2, seed=5)
    first = [a.next_step() for _ in range(4)]
    b = WindowLoader(stream, seq_len=16, micro_batch_size=3, grad_accum=2, seed=5)
    b.load_state_dict({**a.state_dict(), "position": 2})
    for expected in first[2:]:
        got = b.next_step()
        for x, y in zip(expected, got):
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.cu_seqlens, y.cu_seqlens)
    other_seed = WindowLoader(stream, seq_len=16, micro_batch_size=3, grad_accum=2, seed=6).next_step()
    assert not torch.equal(other_seed[0].input_ids, first[0][0].input_ids)


def test_order_does_not_depend_on_world_size():
    """Two ranks with grad_accum 1 see the same windows as one rank with grad_accum 2."""
    stream = _stream(3000)
    single = WindowLoader(stream, seq_len=10, micro_batch_size=2, grad_accum=2, packing=False, seed=1)
    ranks = [
        WindowLoader(
            stream, seq_len=10, micro_batch_size=2, grad_accum=1, packing=False, seed=1, rank=r, world_size=2
        )
        for r in range(2)
    ]
    for _ in range(3):
        one = torch.cat([b.input_ids for b in single.next_step()])
        two = torch.cat([r.next_step()[0].input_ids for r in ranks])
        assert torch.equal(one, two)


def test_epochs_wrap_with_a_new_permutation_and_cover_every_window():
    stream = _stream(100)
    loader = WindowLoader(stream, seq_len=10, micro_batch_size=1, packing=False, seed=3)
    epoch0 = [loader.next_step()[0].input_ids for _ in range(10)]
    epoch1 = [loader.next_step()[0].input_ids for _ in range(10)]
    windows = {tuple(stream.tokens[i * 10 : (i + 1) * 10]) for i in range(10)}
    assert {tuple(w[0].tolist()) for w in epoch0} == windows == {tuple(w[0].tolist()) for w in epoch1}
    assert [w[0].tolist() for w in epoch0] != [w[0].tolist() for w in epoch1]


def test_loader_errors_name_the_argument():
    stream = _stream(50)
    with pytest.raises(ValueError, match="shorter than one window"):
        WindowLoader(stream, seq_len=64, micro_batch_size=1)
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        WindowLoader(stream, seq_len=1, micro_batch_size=1)
    loader = WindowLoader(stream, seq_len=5, micro_batch_size=2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="global batch differs"):
        WindowLoader(stream, seq_len=5, micro_batch_size=1).load_state_dict(state)


def test_evaluation_batches_are_fixed_and_sharded():
    stream = _stream(1000)
    all_batches = evaluation_batches(stream, seq_len=10, micro_batch_size=2, max_batches=4, packing=True)
    shards = [
        evaluation_batches(
            stream, seq_len=10, micro_batch_size=2, max_batches=2, packing=True, rank=r, world_size=2
        )
        for r in range(2)
    ]
    assert len(all_batches) == 4
    interleaved = [shards[0][0], shards[1][0], shards[0][1], shards[1][1]]
    for x, y in zip(all_batches, interleaved):
        assert torch.equal(x.input_ids, y.input_ids)


def test_random_sampling_starts_anywhere_and_is_resumable_and_world_size_free():
    """sampling="random": windows start at any token (not only multiples of seq_len), each window is
    the stream's tokens from its start, the order resumes from the position alone, and two ranks see
    what one rank with grad_accum 2 sees."""
    tokens = np.arange(5000)  # a token's value is its position
    stream = TokenStream(tokens, 5000, None)
    kwargs = dict(seq_len=10, packing=False, seed=3, sampling="random")
    loader = WindowLoader(stream, micro_batch_size=4, grad_accum=2, **kwargs)
    rows = torch.cat([torch.cat([b.input_ids for b in loader.next_step()]) for _ in range(20)])
    firsts = rows[:, 0]
    assert (rows[:, 1:] - rows[:, :-1] == 1).all()  # contiguous tokens
    assert (firsts % 10 != 0).float().mean() > 0.5  # not the fixed cuts
    assert len(set(firsts.tolist())) > 150  # 160 draws from ~5000 starts: few repeats

    again = WindowLoader(stream, micro_batch_size=4, grad_accum=2, **kwargs)
    again.load_state_dict({**loader.state_dict(), "position": 7})
    loader.position = 7
    assert torch.equal(again.next_step()[1].input_ids, loader.next_step()[1].input_ids)

    single = WindowLoader(stream, micro_batch_size=2, grad_accum=2, **kwargs)
    ranks = [WindowLoader(stream, micro_batch_size=2, rank=r, world_size=2, **kwargs) for r in range(2)]
    for _ in range(3):
        one = torch.cat([b.input_ids for b in single.next_step()])
        two = torch.cat([r.next_step()[0].input_ids for r in ranks])
        assert torch.equal(one, two)

    windows = WindowLoader(stream, micro_batch_size=2, seq_len=10, packing=False, seed=3)
    with pytest.raises(ValueError, match="sampling differs"):
        windows.load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="sampling must be"):
        WindowLoader(stream, micro_batch_size=2, seq_len=10, sampling="uniform")
