"""convert_gguf and the atomic-folder helper, on tiny random llama / qwen2 GGUFs written here.

The GGUFs are written the way llama.cpp's converter writes them (Q/K rows of `llama` permuted to
the interleaved rotary layout, ne reversed, norms and biases in F32), from a random HF model, so the
converted folder can be checked against both the HF original and transformers' own GGUF loader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config
from transformers.convert_slow_tokenizer import bytes_to_unicode

from skiptree.errors import ModelSourceError, UnsupportedArchitectureError
from skiptree.models.gguf_convert import (
    COMPLETE_MARKER,
    CONVERTER_VERSION,
    atomic_folder,
    convert_gguf,
    ensure_converted,
    file_sha256,
    is_complete,
)

Q8_0 = gguf.GGMLQuantizationType.Q8_0
F32 = gguf.GGMLQuantizationType.F32
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["the", "def", "return", "hello", "world", "print", "self", "  ", "    ", "():"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPTS = [
    "def hello():\n    return 'world'",
    "<|im_start|>user\nhello<|im_end|>\n",
    "  leading spaces and the end",
    "héllo wörld — ünïcode ✓ 你好",
    "print(self)  ",
]


# --------------------------------------------------------------------------- tiny GGUF writer


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """Byte-level BPE: the 256 byte symbols, merged words, then control tokens."""
    alphabet = list(bytes_to_unicode().values())
    tokens, merges = list(alphabet), []
    for word in WORDS + [" " + w for w in WORDS[:6]]:
        symbols = [bytes_to_unicode()[b] for b in word.encode()]
        while len(symbols) > 1:  # merge left to right: "t h" -> "th", "th e" -> "the"
            merges.append(f"{symbols[0]} {symbols[1]}")
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
            if symbols[0] not in tokens:
                tokens.append(symbols[0])
    merges = list(dict.fromkeys(merges))
    types = [1] * len(tokens) + [3] * len(SPECIALS)
    return tokens + SPECIALS, types, merges


def tiny_hf_model(arch: str, seed: int = 0) -> torch.nn.Module:
    tokens, _, _ = tiny_vocab()
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=len(tokens), max_position_embeddings=128,
                  rms_norm_eps=1e-5, initializer_range=0.2)
    if arch == "llama":
        config = LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=True)
    else:
        config = Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random norms and biases too, so a mix-up cannot hide
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else torch.randn_like(p))
    return model


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate-half -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    layer, rest = hf.removeprefix("model.layers.").split(".", 1)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{parts[module]}.{kind}"


def write_gguf(model: torch.nn.Module, path: Path, qtype=F32, add_bos: bool = False,
               arch: str | None = None) -> Path:
    """Write `model` as llama.cpp would: metadata, tokenizer, tensors (2-D ones in `qtype`)."""
    cfg = model.config
    arch = arch or cfg.model_type
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny {arch}")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "llama":
        writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    tokens, types, merges = tiny_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.detach().numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            array = llama_cpp_permute(array, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            array = llama_cpp_permute(array, cfg.num_key_value_heads)
        if array.ndim == 2 and qtype != F32:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def oracle_logits(gguf_path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(ids).logits


def folder_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[5, 270, 100, 33, 2, 280, 17, 64, 200, 9, 11]])

# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("arch,qtype", [("llama", F32), ("llama", Q8_0), ("qwen2", F32),
                                        ("qwen2", Q8_0)])
def test_logits_equal_transformers_gguf_loader(tmp_path, arch, qtype):
    model = tiny_hf_model(arch)
    path = write_gguf(model, tmp_path / f"tiny-{arch}.gguf", qtype)
    out = convert_gguf(path, tmp_path / "out", progress=False)
    got = folder_logits(out, IDS)
    torch.testing.assert_close(got, oracle_logits(path, IDS), atol=1e-4, rtol=0)
    if qtype == F32:  # also against the untouched HF model: proves the Q/K un-permutation
        with torch.no_grad():
            torch.testing.assert_close(got, model(IDS).logits, atol=1e-5, rtol=0)


def test_weights_match_original_names_and_values(tmp_path):
    model = tiny_hf_model("qwen2")
    out = convert_gguf(write_gguf(model, tmp_path / "q.gguf"), tmp_path / "out", progress=False)
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert names == set(model.state_dict())
        for name in names:
            torch.testing.assert_close(f.get_tensor(name), model.state_dict()[name], atol=0, rtol=0)


def test_config_json(tmp_path):
    path = write_gguf(tiny_hf_model("llama"), tmp_path / "l.gguf")
    out = convert_gguf(path, tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
        "rms_norm_eps": pytest.approx(1e-5), "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "max_position_embeddings": 128, "vocab_size": len(tiny_vocab()[0]),
        "tie_word_embeddings": True, "attention_bias": False, "torch_dtype": "float32",
        "mlp_bias": False, "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"],
    }
    tokens = tiny_vocab()[0]
    assert (config["bos_token_id"], config["eos_token_id"]) == (
        tokens.index("<|im_start|>"), tokens.index("<|im_end|>"))
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    record = json.loads((out / "skiptree_source.json").read_text())
    assert record == {"source_file": "l.gguf", "sha256": file_sha256(path),
                      "converter_version": CONVERTER_VERSION, "grid_tensors": 0}  # F32: no grid


def test_qwen2_config_untied_with_biases(tmp_path):
    out = convert_gguf(write_gguf(tiny_hf_model("qwen2"), tmp_path / "q.gguf"), tmp_path / "o",
                       progress=False)
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["tie_word_embeddings"], config["attention_bias"]) == (
        "qwen2", False, True)
    assert config["rope_theta"] == 1e6


@pytest.mark.parametrize("add_bos", [False, True])
def test_tokenizer_matches_transformers_gguf_tokenizer(tmp_path, add_bos):
    path = write_gguf(tiny_hf_model("llama"), tmp_path / "t.gguf", add_bos=add_bos)
    out = convert_gguf(path, tmp_path / "out", progress=False)
    ours = AutoTokenizer.from_pretrained(out)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    for prompt in PROMPTS:
        assert ours(prompt).input_ids == theirs(prompt).input_ids, prompt
        assert ours.decode(ours(prompt).input_ids) == theirs.decode(theirs(prompt).input_ids)
    bos = tiny_vocab()[0].index("<|im_start|>")
    assert (ours("the").input_ids[0] == bos) == (theirs("the").input_ids[0] == bos)
    messages = [{"role": "user", "content": "hello"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE


def test_progress_bar_on_stderr(tmp_path, capsys):
    convert_gguf(write_gguf(tiny_hf_model("llama"), tmp_path / "l.gguf"), tmp_path / "o")
    captured = capsys.readouterr()
    assert "dequantising" in captured.err and "dequantising" not in captured.out


def test_unsupported_architecture_refused(tmp_path):
    path = write_gguf(tiny_hf_model("llama"), tmp_path / "g.gguf", arch="gemma3")
    with pytest.raises(UnsupportedArchitectureError) as err:
        convert_gguf(path, tmp_path / "out", progress=False)
    assert str(err.value) == (
        "g.gguf has GGUF architecture 'gemma3', which skiptree cannot convert; "
        "use a model of a supported architecture: llama, qwen2."
    )
    assert not (tmp_path / "out").exists()


def test_not_a_gguf_refused(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ModelSourceError, match="is not a readable GGUF file"):
        convert_gguf(bad, tmp_path / "out", progress=False)


# --------------------------------------------------------------------------- atomic folders


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_atomic_folder_leaves_nothing_after_error(tmp_path, error):
    dest = tmp_path / "models" / "m"
    with pytest.raises(error), atomic_folder(dest) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"half")
        raise error()
    assert not dest.exists() and not is_complete(dest)
    assert list(dest.parent.iterdir()) == []


def test_interrupted_conversion_leaves_nothing_valid(tmp_path):
    path = write_gguf(tiny_hf_model("llama"), tmp_path / "l.gguf")
    dest = tmp_path / "cache" / "l"
    (tmp_path / "cache").mkdir()
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelSourceError):
        ensure_converted(truncated, dest, progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_stale_temp_of_dead_process_is_cleaned_and_incomplete_dest_replaced(tmp_path):
    dest = tmp_path / "m"
    stale = tmp_path / ".m.tmp-999999999-deadbeef"  # no such pid
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    dest.mkdir()
    (dest / "config.json").write_text("{}")  # looks like a model but has no marker
    assert not is_complete(dest)
    with atomic_folder(dest) as tmp:
        (tmp / "x").write_text("new")
    assert is_complete(dest) and (dest / "x").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_ensure_converted_reuses_complete_folder(tmp_path):
    path = write_gguf(tiny_hf_model("llama"), tmp_path / "l.gguf")
    dest = ensure_converted(path, tmp_path / "conv", progress=False)
    assert is_complete(dest) and (dest / COMPLETE_MARKER).is_file()
    stamp = os.stat(dest / "model.safetensors").st_mtime_ns
    assert ensure_converted(path, dest, progress=False) == dest
    assert os.stat(dest / "model.safetensors").st_mtime_ns == stamp


def test_killed_process_leaves_only_a_hidden_temp_that_is_cleaned(tmp_path):
    dest = tmp_path / "m"
    script = (
        "import sys, time; from pathlib import Path; from skiptree.models.gguf_convert import atomic_folder\n"
        f"with atomic_folder(Path({str(dest)!r})) as tmp:\n"
        "    (tmp / 'config.json').write_text('{}'); print('ready', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.kill()  # SIGKILL: no cleanup code runs
    proc.wait()
    assert not dest.exists() and [p.name.startswith(".m.tmp-") for p in tmp_path.iterdir()] == [True]
    with atomic_folder(dest) as tmp:
        (tmp / "config.json").write_text("{}")
    assert is_complete(dest) and [p.name for p in tmp_path.iterdir()] == ["m"]
