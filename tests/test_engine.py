"""The serving engine against plain references: the model's own greedy loop and a full forward.

Every test builds a small engine over the session's tiny random-weight checkpoints
(fp32), drives it through its public contract (submit / abort / stats / shutdown)
from an asyncio loop, and compares with code that does not go through the engine.
"""

from __future__ import annotations

import asyncio
import gc
import time

import pytest
import torch

from atlas_server.engine import (
    Engine,
    EngineConfig,
    EngineStoppedError,
    InvalidRequestError,
    QueueFullError,
    SamplingParams,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture(autouse=True, params=[False, True], ids=["serial", "overlap"])
def overlap(request, monkeypatch) -> bool:
    """Every test here runs twice: host work after each step, and overlapped with the next
    step (the CUDA default, engine.py "Overlap"): outputs, stops and aborts must not differ."""
    import atlas_server.engine.engine as engine_module

    monkeypatch.setattr(engine_module, "default_overlap", lambda device: request.param)
    return request.param


async def run(engine: Engine, prompt: list[int], params: SamplingParams, **kw):
    """All events of one request -> (token ids per choice, text per choice, events)."""
    events = [e async for e in engine.submit(prompt, params, **kw)]
    ids = {i: [t for e in events if e.index == i for t in e.token_ids] for i in range(params.n)}
    text = {i: "".join(e.text for e in events if e.index == i) for i in range(params.n)}
    return ids, text, events


def prompts(tokenizer, n: int) -> list[list[int]]:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "in", "rain"]
    return [tokenizer.encode(" ".join(words[: 2 + 3 * i])) for i in range(n)]


async def wait_for(condition, timeout: float = 30.0) -> None:
    """Poll until condition() holds; generous, since a loaded machine is slow to get there."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def rest(stream, timeout: float = 30.0) -> list:
    """The remaining events of a stream; fails (rather than hangs) if it does not end."""

    async def collect():
        return [e async for e in stream]

    return await asyncio.wait_for(collect(), timeout)


# --- correctness against references ------------------------------------------------
async def test_greedy_is_batch_invariant_with_staggered_arrivals(varied_model, make_engine):
    engine = make_engine(max_running=4, max_batched_tokens=16)
    ps = prompts(varied_model.tokenizer, 4)
    expected = [varied_model.model.generate(p, GREEDY.max_tokens) for p in ps]

    async def late(p, delay_tokens, first):
        await first.wait()
        await asyncio.sleep(0.001 * delay_tokens)
        return (await run(engine, p, GREEDY))[0][0]

    first = asyncio.Event()

    async def leader():
        ids = []
        async for e in engine.submit(ps[0], GREEDY):
            ids += e.token_ids
            first.set()
        return ids

    got = await asyncio.gather(leader(), *(late(p, i, first) for i, p in enumerate(ps[1:])))
    assert got == expected


async def test_decode_batch_is_packed_into_the_lowest_slots_without_changing_outputs(
    varied_model, make_engine
):
    """Sequences finish at different times and new prompts take the freed slots while they
    prefill; the engine moves decoding sequences into slots 0..B-1 (a view, not a gather,
    for attention). Every output must still equal the model's own greedy loop."""
    engine = make_engine(max_running=6, max_batched_tokens=24)
    ps = prompts(varied_model.tokenizer, 4) * 3  # 12 requests through 6 slots
    lengths = [3, 9, 5, 12, 2, 7, 10, 4, 6, 8, 11, 3]
    expected = [varied_model.model.generate(p, n) for p, n in zip(ps, lengths, strict=True)]
    seen_slots: list[list[int]] = []
    execute = engine.runner.execute

    def recording(plan, *sampled):
        if plan.decode.slots:
            seen_slots.append(list(plan.decode.slots))
        return execute(plan, *sampled)

    engine.runner.execute = recording
    got = await asyncio.gather(
        *(
            run(engine, p, SamplingParams(temperature=0.0, max_tokens=n))
            for p, n in zip(ps, lengths, strict=True)
        )
    )
    assert [ids[0] for ids, _, _ in got] == expected
    assert seen_slots and all(slots == list(range(len(slots))) for slots in seen_slots)
    assert max(len(slots) for slots in seen_slots) > 1
    assert engine.stats().kv_slots_used == 0


async def test_chunked_prefill_equals_unchunked(varied_model, make_engine):
    prompt = varied_model.tokenizer.encode("chunked prefill " * 8)  # > 100 tokens
    params = SamplingParams(temperature=0.0, max_tokens=6, prompt_logprobs=2)
    chunked = await run(make_engine(max_running=2, max_batched_tokens=7), prompt, params)
    whole = await run(make_engine(max_running=2, max_batched_tokens=512), prompt, params)
    assert chunked[0] == whole[0]
    a, b = chunked[2][0].prompt_logprobs, whole[2][0].prompt_logprobs
    assert [x and x.logprob for x in a] == pytest.approx([x and x.logprob for x in b], abs=1e-5)


async def test_prompt_logprobs_equal_a_full_forward(varied_model, make_engine):
    engine = make_engine(max_running=2, max_batched_tokens=16)
    prompt = varied_model.tokenizer.encode("echo these prompt tokens back with scores")
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=1, prompt_logprobs=1)
    _, _, events = await run(engine, prompt, params)
    entries = events[0].prompt_logprobs
    with torch.inference_mode():
        ref = torch.log_softmax(varied_model.model(torch.tensor([prompt]))[0].float(), -1)  # [T, V]
    assert entries[0] is None and len(entries) == len(prompt)
    for i in range(1, len(prompt)):
        assert entries[i].token_id == prompt[i]
        assert entries[i].logprob == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-5)
        assert list(entries[i].top) == [int(ref[i - 1].argmax())]
    sampled = events[0].logprobs[0]
    assert sampled.logprob == pytest.approx(float(ref[-1].max()), abs=1e-5)


async def test_sampled_token_logprobs_are_the_raw_model_distribution(varied_model, make_engine):
    engine = make_engine(max_running=2, max_batched_tokens=32)
    prompt = varied_model.tokenizer.encode("logprobs of sampled tokens")
    params = SamplingParams(temperature=1.5, top_k=10, max_tokens=5, logprobs=3, seed=1)
    ids, _, events = await run(engine, prompt, params)
    entries = [lp for e in events for lp in (e.logprobs or [])]
    with torch.inference_mode():
        full = torch.tensor([prompt + ids[0]])
        ref = torch.log_softmax(varied_model.model(full)[0].float(), -1)
    for j, entry in enumerate(entries):
        row = ref[len(prompt) - 1 + j]
        assert entry.logprob == pytest.approx(float(row[ids[0][j]]), abs=1e-5)
        assert len(entry.top) == 3 and max(entry.top.values()) == pytest.approx(
            float(row.max()), abs=1e-5
        )


async def test_same_seed_same_text_alone_and_in_a_mixed_batch(varied_model, make_engine):
    engine = make_engine(max_running=6, max_batched_tokens=64)
    prompt = varied_model.tokenizer.encode("seeded sampling")
    seeded = SamplingParams(temperature=1.0, max_tokens=16, seed=1234)
    alone = (await run(engine, prompt, seeded))[0][0]
    others = [
        run(engine, p, SamplingParams(temperature=1.0, max_tokens=10 + i))
        for i, p in enumerate(prompts(varied_model.tokenizer, 4))
    ]
    mixed, *_ = await asyncio.gather(run(engine, prompt, seeded), *others)
    assert mixed[0][0] == alone
    other_seed = await run(engine, prompt, SamplingParams(temperature=1.0, max_tokens=16, seed=99))
    assert other_seed[0][0] != alone


async def test_n_choices_share_prefill_and_sample_independently(varied_model, make_engine):
    engine = make_engine(max_running=4, max_batched_tokens=8)
    prompt = varied_model.tokenizer.encode("several choices of one prompt")
    greedy = await run(engine, prompt, SamplingParams(temperature=0.0, max_tokens=8, n=3))
    expected = varied_model.model.generate(prompt, 8)
    assert all(greedy[0][i] == expected for i in range(3))

    params = SamplingParams(temperature=1.0, max_tokens=12, n=3, seed=7)
    first, second = await run(engine, prompt, params), await run(engine, prompt, params)
    assert first[0] == second[0]
    assert len({tuple(v) for v in first[0].values()}) == 3
    # Choice i draws from seed + i: the same stream as a single request with that seed.
    single = await run(engine, prompt, SamplingParams(temperature=1.0, max_tokens=12, seed=9))
    assert first[0][2] == single[0][0]
    assert engine.stats().kv_slots_used == 0


async def test_stop_string_spanning_tokens_is_cut_and_never_streamed(varied_model, make_engine):
    engine = make_engine(max_running=2, max_batched_tokens=32)
    prompt = varied_model.tokenizer.encode("stop strings")
    base = SamplingParams(temperature=1.0, max_tokens=40, seed=5)
    _, text, _ = await run(engine, prompt, base)
    full = text[0]
    stop = full[12:15]  # three byte tokens long
    cut = full.index(stop)
    params = SamplingParams(temperature=1.0, max_tokens=40, seed=5, stop=(stop, "never-seen"))
    before = engine.stats().generation_tokens_total
    ids, text, events = await run(engine, prompt, params)
    assert text[0] == full[:cut]
    assert all(stop not in e.text for e in events)
    assert events[-1].finish_reason == "stop" and events[-1].stop_reason == stop
    # With overlap the next step had already sampled a token for it: that one is dropped.
    await wait_for(lambda: engine.stats().running == 0)
    generated = engine.stats().generation_tokens_total - before
    assert generated == len(ids[0]) == events[-1].num_generated_tokens


async def test_overlap_queues_the_next_forward_before_reading_a_steps_tokens(
    varied_model, make_engine, overlap
):
    """Overlap mode queues step N+1's forward, fed step N's sampled ids on the device,
    before the host reads step N's tokens, and emits step N's events after that; serial
    mode reads and emits step N before step N+1 starts. The tokens are the same."""
    engine = make_engine(max_running=2, max_batched_tokens=32)
    log: list[str] = []
    execute, take_tokens = engine.runner.execute, engine.outputs.take_tokens
    emit_text = engine.outputs.emit_text

    def logged_execute(plan, sampled=None):
        fed = plan.decode.feeds_sampled
        assert fed == (sampled is not None and bool(plan.decode.tokens))
        log.append("step fed on device" if fed else "step")
        return execute(plan, sampled)

    def logged_take(pending):
        log.append("read")
        return take_tokens(pending)

    def logged_emit(pending):
        log.append("events")
        return emit_text(pending)

    engine.runner.execute = logged_execute
    engine.outputs.take_tokens, engine.outputs.emit_text = logged_take, logged_emit
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    prompt = varied_model.tokenizer.encode("overlap")
    ids, _, events = await run(engine, prompt, params)
    assert ids[0] == varied_model.model.generate(prompt, 3)
    assert events[-1].finish_reason == "length"
    if overlap:  # the third token is the last: no fourth forward is queued for it
        assert log == [
            "step",
            *["step fed on device", "read", "events"] * 2,
            *["read", "events"],
        ]
    else:
        assert log == ["step", "read", "events"] * 3


def feature_mix(eos: int) -> list[SamplingParams]:
    """Requests that touch every feature whose state overlap mode must keep exact:
    penalties over the output so far, min_tokens, seeded streams (n > 1 included),
    logprobs, stop strings, stop ids and EOS found while the next step is already queued,
    and max_tokens."""
    return [
        SamplingParams(temperature=0.9, seed=1, max_tokens=24, repetition_penalty=1.3,
                       presence_penalty=0.5, frequency_penalty=0.5, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=2, max_tokens=20, top_k=20, top_p=0.9,
                       min_p=0.05, logprobs=3, n=2),
        # The bias makes "e" likely whatever the seed draws (byte tokenizer: 101 is "e").
        SamplingParams(temperature=1.0, seed=3, max_tokens=30, stop=("e", "th"),
                       logit_bias={101: 4.0}),
        SamplingParams(temperature=1.0, seed=4, max_tokens=16, min_tokens=5,
                       logit_bias={eos: 6.0}),
        SamplingParams(temperature=1.0, seed=5, max_tokens=16, stop_token_ids=(101,),
                       logit_bias={101: 4.0}),
        SamplingParams(temperature=0.0, max_tokens=10, frequency_penalty=1.0),
    ]  # fmt: skip


async def feature_mix_outputs(engine: Engine, ps: list[list[int]]):
    """feature_mix run concurrently -> ([(ids, text, final events, logprob ids)] per
    request, the engine's generated-token count once its slots are back)."""
    mix = feature_mix(engine.tokenizer.eot_id)
    results = await asyncio.gather(
        *(run(engine, ps[i % len(ps)], params) for i, params in enumerate(mix))
    )
    await wait_for(lambda: engine.stats().kv_slots_used == 0)
    summary = []
    for ids, text, events in results:
        finals = sorted((e.index, e.finish_reason, e.stop_reason) for e in events if e.finished)
        logprobs = [e.logprobs[0].token_id for e in events if e.logprobs]
        summary.append((ids, text, finals, logprobs))
    return summary, engine.stats().generation_tokens_total


async def test_overlap_and_serial_give_the_same_outputs_for_every_sampling_feature(
    varied_model, make_engine
):
    """The two modes side by side on feature_mix, concurrently through few slots."""
    ps = prompts(varied_model.tokenizer, 4)
    results = []
    for overlap in (False, True):
        engine = make_engine(max_running=4, max_batched_tokens=12, overlap=overlap)
        assert engine.overlap is overlap
        results.append(await feature_mix_outputs(engine, ps))
    serial, overlapped = results
    assert overlapped == serial
    endings = {(r, type(why).__name__) for _, _, finals, _ in serial[0] for _, r, why in finals}
    # max_tokens, EOS, a stop string and a stop id all ended some sequence
    assert endings == {
        ("length", "NoneType"),
        ("stop", "NoneType"),
        ("stop", "str"),
        ("stop", "int"),
    }


async def test_a_checkpoints_own_eos_ids_end_generation(tmp_path):
    """A tokenizer without <|endoftext|> (TinyLlama's </s>, Llama 3 Instruct's pair): the
    ids import-hf recorded end a generation, else the end-of-text token found by name."""
    from atlas_server.checkpoint import save_checkpoint
    from atlas_server.model import Transformer, load_preset
    from atlas_server.tokenizer import TrainConfig, train_from_texts
    from atlas_server.tokenizer.corpus import stdlib_sample

    specials = ("<s>", "</s>", "<|eot_id|>")
    tok = train_from_texts(
        stdlib_sample(20_000), TrainConfig(vocab_size=300, special_tokens=specials)
    )
    assert tok.eot_id is None
    end, turn = tok.special_tokens["</s>"], tok.special_tokens["<|eot_id|>"]
    model = Transformer(load_preset("gpt2-tiny", vocab_size=tok.vocab_size))
    save_checkpoint(tmp_path / "named", model, tok)
    save_checkpoint(tmp_path / "recorded", model, tok, provenance={"eos_token_id": [end, turn]})
    for folder, stops in (("named", {end}), ("recorded", {end, turn})):
        engine = Engine.from_checkpoint(tmp_path / folder, EngineConfig(max_running=2)).start()
        try:
            for eos in (end, turn):
                params = SamplingParams(logit_bias={eos: 100.0}, max_tokens=3)
                ids, _, events = await run(engine, tok.encode("the end"), params)
                if eos in stops:
                    assert (ids[0], events[-1].finish_reason) == ([eos], "stop"), folder
                else:
                    assert (ids[0], events[-1].finish_reason) == ([eos] * 3, "length"), folder
        finally:
            engine.shutdown()


async def test_stop_token_ids_eos_and_ignore_eos(varied_model, make_engine):
    engine = make_engine(max_running=2, max_batched_tokens=32)
    tok = varied_model.tokenizer
    prompt = tok.encode("stop ids")
    forced = {65: 100.0}  # "A"
    _, _, events = await run(
        engine, prompt, SamplingParams(logit_bias=forced, stop_token_ids=(65,))
    )
    assert events[-1].finish_reason == "stop" and events[-1].stop_reason == 65
    assert events[-1].num_generated_tokens == 1

    eos = {tok.eot_id: 100.0}
    ids, text, events = await run(engine, prompt, SamplingParams(logit_bias=eos, max_tokens=5))
    assert (ids[0], text[0], events[-1].finish_reason) == ([tok.eot_id], "", "stop")
    ids, _, events = await run(
        engine, prompt, SamplingParams(logit_bias=eos, max_tokens=5, ignore_eos=True)
    )
    assert len(ids[0]) == 5 and events[-1].finish_reason == "length"


async def test_min_tokens_delays_stop_strings_and_ids(varied_model, make_engine):
    engine = make_engine(max_running=2, max_batched_tokens=32)
    prompt = varied_model.tokenizer.encode("min tokens")
    forced = {65: 100.0}
    _, text, events = await run(
        engine, prompt, SamplingParams(logit_bias=forced, stop=("A",), min_tokens=3, max_tokens=9)
    )
    assert text[0] == "AA" and events[-1].stop_reason == "A"
    eos = varied_model.tokenizer.eot_id
    ids, _, events = await run(
        engine, prompt, SamplingParams(logit_bias={eos: 100.0}, min_tokens=4, max_tokens=9)
    )
    assert eos not in ids[0][:4] and ids[0][4] == eos and events[-1].finish_reason == "stop"


async def test_max_tokens_finishes_with_length_and_text_matches_decode(varied_model, make_engine):
    engine = make_engine(max_running=2, max_batched_tokens=32)
    prompt = varied_model.tokenizer.encode("length")
    # Random bytes from a byte-level vocab split UTF-8 characters across tokens often.
    ids, text, events = await run(
        engine, prompt, SamplingParams(max_tokens=30, seed=3, ignore_eos=True)
    )
    assert len(ids[0]) == 30 and events[-1].finish_reason == "length"
    assert text[0] == varied_model.tokenizer.decode(ids[0])
    assert [e.num_generated_tokens for e in events] == list(range(1, 31))
    assert events[0].queue_time_s is not None and events[0].queue_time_s >= 0
    assert events[-1].first_token_time >= events[-1].arrival_time


# --- scheduling and lifecycle ---------------------------------------------------------
async def test_requests_join_and_leave_between_steps(varied_model, gated_engine):
    engine, gate = gated_engine(max_running=4, max_batched_tokens=64)
    prompt = varied_model.tokenizer.encode("continuous batching")
    long_stream = engine.submit(prompt, SamplingParams(max_tokens=40, ignore_eos=True))
    first = await long_stream.__anext__()  # the long request is running
    short = asyncio.ensure_future(
        run(engine, prompt, SamplingParams(max_tokens=5, ignore_eos=True))
    )
    # Not before the short request reached the engine: the permits could all go to the
    # long one's steps first (test_prefix_cache.py's twin of this test timed out so).
    deadline = asyncio.get_running_loop().time() + 30
    while engine.stats().running + engine.stats().waiting < 2:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.001)
    gate.allow(10)  # enough steps for the short request, far too few for the long one
    _, _, short_events = await asyncio.wait_for(short, 30)
    # The short request joined and ran to completion while the long one was mid-stream.
    assert short_events[-1].finish_reason == "length"
    assert engine.stats().running == 1
    gate.open()
    events = [first, *await rest(long_stream)]
    assert sum(len(e.token_ids) for e in events) == 40 and events[-1].finish_reason == "length"
    # Shared steps: fewer steps than the two requests' tokens run one after the other.
    assert engine.stats().steps_total < 40 + 5


async def test_queued_requests_start_at_once_when_a_slot_frees(varied_model, make_engine):
    """The engine thread never sits out its idle poll while requests wait for a slot."""
    engine = make_engine(max_running=1, max_batched_tokens=32)
    stalls = []
    wait = engine._wake.wait

    def recording_wait(timeout=None):
        woke = wait(timeout)
        if not woke and (engine.scheduler.waiting or engine.scheduler.running):
            stalls.append(engine.stats())
        return woke

    engine._wake.wait = recording_wait
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    results = await asyncio.gather(*(run(engine, [1, 2, i], params) for i in range(4)))
    assert all(len(ids[0]) == 3 for ids, _, _ in results)
    assert stalls == []


# The abort tests run behind a StepGate (conftest.py): after its first token a request gets
# one more decode step, so it can end only by being aborted, however loaded the machine is.
LONG = SamplingParams(max_tokens=200, ignore_eos=True)


async def test_abort_by_id_frees_the_slot(varied_model, gated_engine):
    engine, gate = gated_engine(max_running=2, max_batched_tokens=32)
    stream = engine.submit([1, 2, 3], LONG, "req-x")
    await stream.__anext__()
    engine.abort("req-x")
    gate.allow()  # the step that may be waiting already; the abort applies after it
    events = await rest(stream)
    assert events[-1].finish_reason == "abort"
    await wait_for(lambda: engine.stats().kv_slots_used == 0)
    assert engine.stats().running == 0 and engine.stats().generation_tokens_total <= 2


async def test_consumer_aclose_aborts_within_a_step(varied_model, gated_engine):
    engine, gate = gated_engine(max_running=2, max_batched_tokens=32)
    stream = engine.submit([1, 2, 3], LONG)
    await stream.__anext__()
    await stream.aclose()
    gate.allow()
    await wait_for(lambda: engine.stats().kv_slots_used == 0)
    assert engine.stats().generation_tokens_total <= 2


async def test_dropped_stream_is_aborted_when_garbage_collected(varied_model, gated_engine):
    engine, gate = gated_engine(max_running=2, max_batched_tokens=32)
    stream = engine.submit([1, 2, 3], LONG)
    await wait_for(lambda: engine.stats().generation_tokens_total > 0)
    del stream
    gc.collect()
    gate.allow()
    await wait_for(lambda: engine.stats().kv_slots_used == 0)
    assert engine.stats().generation_tokens_total <= 2


async def test_a_failing_step_ends_running_requests_with_error(varied_model, make_engine):
    engine = make_engine(max_running=2, max_batched_tokens=32)
    real_execute = engine.runner.execute

    def failing(plan, *sampled):  # the prompt prefills; the first decode step fails
        if plan.decode.tokens:
            raise RuntimeError("boom")
        return real_execute(plan, *sampled)

    engine.runner.execute = failing
    _, _, events = await run(engine, [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    assert events[-1].finish_reason == "error" and "boom" in events[-1].error
    assert engine.stats().kv_slots_used == 0
    engine.runner.execute = real_execute  # the engine thread survived and serves again
    _, _, events = await run(engine, [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    assert events[-1].finish_reason == "length"


async def test_a_request_that_cannot_be_admitted_fails_alone(varied_model, make_engine):
    """A bug while admitting one request (found by fuzzing: an out-of-range seed used to
    raise here and kill the engine thread, leaving every later request queued forever)."""
    engine = make_engine(max_running=4, max_batched_tokens=32)
    real_place = engine.scheduler._place

    def failing(seq, plan):
        if seq.request.params.seed == 7 and seq.index == 1:  # after choice 0 took a slot
            raise OverflowError("bad seed")
        return real_place(seq, plan)

    engine.scheduler._place = failing
    _, _, events = await run(engine, [1, 2], SamplingParams(n=2, seed=7, max_tokens=3))
    assert {e.index for e in events} == {0, 1}
    assert all(e.finish_reason == "error" and "bad seed" in e.error for e in events)
    assert engine.stats().kv_slots_used == 0 and engine.is_running
    ids, _, events = await run(engine, [1, 2], SamplingParams(n=4, max_tokens=3, ignore_eos=True))
    assert all(len(ids[i]) == 3 for i in range(4))  # every slot came back


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_dead_engine_thread_refuses_new_requests(varied_model, make_engine):
    engine = make_engine(max_running=2)

    def crash():
        raise RuntimeError("bug")

    engine._apply_aborts = crash  # runs outside the step's error handling
    engine._wake.set()
    await wait_for(lambda: not engine.is_running)
    assert engine.stopped_unexpectedly
    with pytest.raises(EngineStoppedError, match="engine thread has stopped"):
        engine.submit([1], SamplingParams())


async def test_cancelled_consumer_task_aborts(varied_model, gated_engine):
    engine, gate = gated_engine(max_running=2, max_batched_tokens=32)

    async def consume():
        async for _ in engine.submit([1, 2, 3], LONG):
            await asyncio.sleep(0)

    task = asyncio.create_task(consume())
    await wait_for(lambda: engine.stats().generation_tokens_total > 0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    gate.allow()
    await wait_for(lambda: engine.stats().kv_slots_used == 0)
    assert engine.stats().generation_tokens_total <= 2


async def test_shutdown_ends_streams_with_abort(varied_model, gated_engine):
    engine, gate = gated_engine(max_running=1, max_batched_tokens=32, max_queued=4)
    running = engine.submit([1, 2], LONG)
    queued = engine.submit([3, 4], SamplingParams(max_tokens=5))
    await running.__anext__()
    stopped = asyncio.ensure_future(asyncio.to_thread(engine.shutdown, 30))
    await wait_for(lambda: engine.stopping)
    gate.open()  # the waiting step ends; the engine thread then sees the shutdown
    await stopped
    assert (await rest(running))[-1].finish_reason == "abort"
    assert (await rest(queued))[-1].finish_reason == "abort"
    assert not engine.is_running
    with pytest.raises(EngineStoppedError):
        engine.submit([1], SamplingParams())


async def test_drain_finishes_accepted_work_and_refuses_new(varied_model, make_engine):
    engine = make_engine(max_running=1, max_batched_tokens=32, max_queued=4)
    streams = [
        engine.submit([1, 2], SamplingParams(max_tokens=6, ignore_eos=True)) for _ in range(2)
    ]
    drained = asyncio.create_task(asyncio.to_thread(engine.drain, 60))
    await wait_for(lambda: engine.draining)
    with pytest.raises(EngineStoppedError):
        engine.submit([1], SamplingParams())
    finals = []
    for stream in streams:
        finals.append([e async for e in stream][-1])
    assert await drained
    assert [f.finish_reason for f in finals] == ["length", "length"]


# --- refusals before queueing --------------------------------------------------------------
async def test_queue_full_is_refused_with_retry_after(varied_model):
    engine = Engine(
        varied_model.model, varied_model.tokenizer, EngineConfig(max_running=1, max_queued=2)
    )
    # Not started: everything stays queued.
    engine.submit([1], SamplingParams())
    engine.submit([1], SamplingParams())
    with pytest.raises(QueueFullError) as err:
        engine.submit([1], SamplingParams())
    assert err.value.retry_after > 0
    assert engine.stats().waiting == 2
    engine.shutdown()


async def test_zero_queue_still_admits_into_free_slots(varied_model, gated_engine):
    engine, _ = gated_engine(max_running=1, max_batched_tokens=32, max_queued=0)
    stream = engine.submit([1, 2], SamplingParams(max_tokens=50, ignore_eos=True))
    await stream.__anext__()  # running (and held there): the slot is taken, nothing may queue
    with pytest.raises(QueueFullError):
        engine.submit([1], SamplingParams())
    await stream.aclose()


@pytest.mark.parametrize(
    ("prompt", "params", "param"),
    [
        ([], SamplingParams(), "prompt"),
        ([1, 10**6], SamplingParams(), "prompt"),
        ([1, "a"], SamplingParams(), "prompt"),
        ([1], SamplingParams(logit_bias={"5": 1.0}), "logit_bias"),
        ([1] * 200, SamplingParams(max_tokens=100), "max_tokens"),
        ([1], SamplingParams(max_tokens=0), "max_tokens"),
        ([1], SamplingParams(temperature=-0.5), "temperature"),
        ([1], SamplingParams(top_p=0.0), "top_p"),
        ([1], SamplingParams(top_p=1.5), "top_p"),
        ([1], SamplingParams(min_p=2.0), "min_p"),
        ([1], SamplingParams(n=0), "n"),
        ([1], SamplingParams(n=99), "n"),
        ([1], SamplingParams(logprobs=21), "logprobs"),
        ([1], SamplingParams(prompt_logprobs=-1), "prompt_logprobs"),
        ([1], SamplingParams(presence_penalty=3.0), "presence_penalty"),
        ([1], SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        ([1], SamplingParams(repetition_penalty=1e-3), "repetition_penalty"),  # fp32 overflow
        ([1], SamplingParams(min_tokens=20, max_tokens=5), "min_tokens"),
        ([1], SamplingParams(logit_bias={10**6: 1.0}), "logit_bias"),
        ([1], SamplingParams(stop_token_ids=(-1,)), "stop_token_ids"),
        ([1], SamplingParams(seed=2**63), "seed"),  # torch generators take 64-bit seeds
        ([1], SamplingParams(seed=-(2**63) - 1), "seed"),
    ],
)
async def test_invalid_requests_are_refused_naming_the_field(varied_model, prompt, params, param):
    engine = Engine(varied_model.model, varied_model.tokenizer, EngineConfig(max_running=4))
    with pytest.raises(InvalidRequestError) as err:
        engine.submit(prompt, params)
    assert err.value.param == param
    assert engine.stats().waiting == 0


async def test_from_checkpoint_serves_the_saved_model(tiny_checkpoint):
    engine = Engine.from_checkpoint(tiny_checkpoint, EngineConfig(max_running=2)).start()
    try:
        prompt = engine.tokenizer.encode("from a checkpoint")
        ids, _, _ = await run(engine, prompt, GREEDY)
        assert ids[0] == engine.model.generate(prompt, GREEDY.max_tokens)
        assert engine.max_model_len == engine.model.config.max_seq_len
    finally:
        engine.shutdown()
