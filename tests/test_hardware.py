"""Models whose layers live on several devices or are offloaded (accelerate's `device_map`), and caches that move.

This machine has one device, the CPU. Two setups still test what several devices need:
- disk offload through `from_pretrained(device_map=..., offload_folder=...)`: accelerate's hooks load weights (the
  FAM prompt and gate included) only while their module runs and leave them on `meta` otherwise. Logits must equal
  the plain model's. (CPU offload needs an accelerator to execute on; here the CPU is the execution device.)
- Layers split between the CPU and `meta`: `meta` is a second device on which any tensor of the CPU makes an
  operation fail, so every tensor a layer call uses (FAM state, cache buffers and write indices, `completes`,
  masks, positions) must be on that layer's device. Only shapes and devices are checked there.
"""

import pytest
import torch
from conftest import assert_logits_close, random_ids, tiny_base
from test_fam_core import randomize_fam
from transformers import AutoModelForCausalLM

import hf_fam
from hf_fam import FamCache


def saved_fam(tmp_path, family="llama", attn="eager", **settings):
    settings = {"block_size": 4, "memory_segments": 1, "fam_length": 2, **settings}
    fam = randomize_fam(hf_fam.convert_to_fam(tiny_base(family, attn), **settings)).eval()
    fam.save_pretrained(tmp_path / "model")
    return fam


def offloaded(tmp_path, attn="eager"):
    """The saved model with the (tied) embedding and head, layer 1, the FAM prompt and the FAM gate offloaded to disk
    (their weights on `meta`, loaded by accelerate's hooks while their module runs)."""
    device_map = {
        "model.embed_tokens": "disk",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "lm_head": "disk",
        "fam_prompt": "disk",
        "fam_gate": "disk",
    }
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload", attn_implementation=attn
    ).eval()
    assert model.fam_prompt.weight.device.type == "meta" and model.fam_gate.weight.device.type == "meta"
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    return model


def test_offloaded_model_equals_the_plain_model(tmp_path):
    plain = saved_fam(tmp_path)
    model = offloaded(tmp_path)
    ids = random_ids(2, 23, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = plain(ids, attention_mask=mask).logits
        assert_logits_close(model(ids, attention_mask=mask).logits, expected)
        cache, chunks = None, []
        for start, end in ((0, 5), (5, 6), (6, 17), (17, 23)):
            out = model(ids[:, start:end], attention_mask=mask[:, :end], cache=cache, use_cache=True)
            cache = out.past_key_values
            chunks.append(out.logits)
    keep = mask.bool()
    assert_logits_close(torch.cat(chunks, 1)[keep], expected[keep], what="offloaded, chunked")
    streamed = torch.cat(list(hf_fam.stream_log_likelihood(model, [ids[:1, :7], ids[:1, 7:]])), dim=1)
    log_probs = torch.log_softmax(expected[:1].float(), dim=-1)[:, :-1].gather(-1, ids[:1, 1:, None])[..., 0]
    torch.testing.assert_close(streamed, log_probs, rtol=1e-5, atol=1e-5)


def test_offloaded_model_generates_like_the_plain_model(tmp_path):
    plain = saved_fam(tmp_path)
    model = offloaded(tmp_path)
    ids = random_ids(1, 9, seed=5)
    settings = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = plain.generate(ids, **settings)
    actual = model.generate(ids, **settings)
    assert torch.equal(actual.sequences, expected.sequences)
    for step, (a, e) in enumerate(zip(actual.logits, expected.logits)):
        assert_logits_close(a, e, what=f"step {step}")


def split_over_cpu_and_meta(model, first_meta_layer):
    """Layers from `first_meta_layer` on, the final norm and the head on `meta`: a second device."""
    for layer in model.model.layers[first_meta_layer:]:
        layer.to("meta")
    model.model.norm.to("meta")
    model.lm_head.to("meta")
    return model


@pytest.mark.parametrize("family, attn", [("gemma3_text", "sdpa"), ("mistral", "eager")])
def test_every_layer_call_runs_on_its_layers_device(family, attn):
    """Split over two devices, one call and a continued stream (left padding, windows that slide, FAM updates, the
    gated update) run; each layer's cache lives on its layer's device and the counters on the input's."""
    fam = randomize_fam(hf_fam.convert_to_fam(tiny_base(family, attn), block_size=4, memory_segments=1, fam_length=2))
    model = split_over_cpu_and_meta(fam.eval(), 1)
    ids = random_ids(2, 19, seed=6)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        assert out.logits.device.type == "meta" and out.logits.shape == (2, 19, 256)
        cache = out.past_key_values
        for step in range(6):  # decoding steps across a block boundary
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            out = model(ids[:, step : step + 1], attention_mask=mask, cache=cache, use_cache=True)
    devices = model.layer_devices(torch.device("cpu"))
    assert [d.type for d in devices] == ["cpu"] + ["meta"] * (len(devices) - 1)
    for layer, device in zip(cache.layers, devices):
        assert {t.device for t in layer.tensors().values()} == {device}
    assert cache.token_count.device.type == "cpu"


def test_a_training_step_runs_split_over_two_devices():
    """With gradients on, the cache is written on copies and the windows slide out of place: on each layer's device."""
    fam = randomize_fam(hf_fam.convert_to_fam(tiny_base("qwen2"), block_size=4, memory_segments=1, fam_length=2))
    model = split_over_cpu_and_meta(fam.train(), 1)
    ids = random_ids(2, 14, seed=8)
    out = model(ids, labels=ids)
    assert out.loss.device.type == "meta"


def test_router_loss_gathers_router_logits_from_layers_on_several_devices():
    """(mixtral's experts have no kernel on `meta`, so the loss itself is given router logits of two devices.)"""
    fam = hf_fam.convert_to_fam(tiny_base("mixtral"), block_size=4, memory_segments=1, fam_length=2)
    first, second = torch.randn(6, 4), torch.randn(5, 4)
    assert fam._router.load_balancing_loss([first.to("meta"), second]).device.type == "meta"


def test_load_puts_the_stream_state_on_the_models_devices(tmp_path):
    """`FamCache.load(path, model=model)` loads each layer's share onto the device that layer computes on."""
    fam = randomize_fam(hf_fam.convert_to_fam(tiny_base("llama"), block_size=4, memory_segments=1, fam_length=2)).eval()
    ids = random_ids(1, 11)
    with torch.no_grad():
        fam(ids, use_cache=True).past_key_values.save(tmp_path / "stream.safetensors")
    model = split_over_cpu_and_meta(fam, 1)
    cache = FamCache.load(tmp_path / "stream.safetensors", model=model)
    assert [layer.keys.device.type for layer in cache.layers] == ["cpu", "meta"]
    assert [layer.fam_state.device.type for layer in cache.layers] == ["cpu", "meta"]
    assert cache.token_count.device.type == "cpu"
    with pytest.raises(ValueError, match="not both"):
        FamCache.load(tmp_path / "stream.safetensors", model=model, device="cpu")
    with torch.no_grad():  # a cache loaded elsewhere (here: all on the CPU) moves to the model's devices at its next call
        restored = FamCache.load(tmp_path / "stream.safetensors", device="cpu")
        assert restored.layers[1].keys.device.type == "cpu"
        model(ids[:, :2], cache=restored)
    assert [layer.keys.device.type for layer in restored.layers] == ["cpu", "meta"]


def test_what_layer_calls_read_is_moved_once_per_device_not_per_layer(monkeypatch):
    """Four layers on two devices: each block segment's masks, positions and cache indices are moved twice."""
    from hf_fam import modeling_fam

    fam = randomize_fam(hf_fam.convert_to_fam(tiny_base("gemma3_text"), block_size=4, memory_segments=1, fam_length=2))
    model = split_over_cpu_and_meta(fam.eval(), 2)
    moved, calls = [], []
    original = modeling_fam._SegmentOnDevice.__init__

    def counting(self, *args, **kwargs):
        moved.append(kwargs["position_ids"].device)
        original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_fam._SegmentOnDevice, "__init__", counting)
    handle = model.model.layers[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    with torch.no_grad():
        model(random_ids(1, 13))
    handle.remove()
    segments = len(calls)  # a new stream of one row computes S0 in its first segment's calls, no pass of its own
    assert segments == 4
    assert sorted(d.type for d in moved) == ["cpu"] * segments + ["meta"] * segments


def test_threads_running_one_model_at_once_get_its_logits():
    """A server may run one model from several threads. With sdpa, hf_fam switches the base configuration's attention
    name during a layer call (`_attention_implementation`): other threads must neither be refused for the switched
    name nor leave it switched when they finish, and every thread gets the model's logits."""
    import threading

    fam = randomize_fam(hf_fam.convert_to_fam(tiny_base("llama", "sdpa"), block_size=4, memory_segments=2, fam_length=2)).eval()
    ids = random_ids(2, 30)
    with torch.no_grad():
        expected = fam(ids).logits
    failures, start = [], threading.Barrier(3)

    def run():
        start.wait()
        for _ in range(15):
            try:
                with torch.no_grad():
                    logits = fam(ids).logits
                if not torch.allclose(logits, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item()):
                    failures.append("different logits")
            except Exception as error:  # noqa: BLE001 - what a thread raises is the failure reported
                failures.append(repr(error)[:200])

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, f"{len(failures)} of 45 forward passes failed, e.g. {failures[0]}"
    assert fam.model.config._attn_implementation == "sdpa"
