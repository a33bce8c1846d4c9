# Loading the vision-language model that VL-DAC (arXiv 2508.04280) trains: the tiny offline Qwen2-VL, a local
# directory, a hub id, or a directory written by `vldac.py --save-model`.
import functools
import json
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hub_constants
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from transformers import AutoModelForImageTextToText, AutoProcessor

import tiny_vlm
from flags import fail

# Per family, where transformers names them: the language model (LoRA's targets) is `language_model` (Qwen, Gemma,
# InternVL, LLaVA) or `text_model` (SmolVLM); the vision tower and its projector, frozen always, are `visual` (Qwen),
# `vision_tower` + `multi_modal_projector` (Gemma 3, InternVL, LLaVA; LLaVA-OneVision's `image_newline` too) or
# `vision_model` + `connector` (SmolVLM).
LORA_TARGETS = r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_TOWER = ("visual", "vision_tower", "multi_modal_projector", "image_newline", "vision_model", "connector")


def model_dir(model_id):
    """A training run's directory (runs/NAME) stands for the model it saved (runs/NAME/model); else model_id."""
    saved = Path(model_id) / "model"
    return str(saved) if not (Path(model_id) / "config.json").exists() and (saved / "args.json").exists() else model_id


def is_tiny(model_id):
    """`tiny`, a tiny_vlm build directory, or a vldac checkpoint (or its run) trained from one."""
    model_id = model_dir(model_id)
    if model_id == "tiny" or (Path(model_id) / "tiny_vlm.json").exists():
        return True
    saved_args = Path(model_id) / "args.json"
    return saved_args.exists() and is_tiny(json.loads(saved_args.read_text())["model_id"])


def why_not_loadable(model_id, error):
    """The likely cause, in words, of a model that failed to load."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        if (path / "checkpoint.pt").exists():
            return (f"{model_id} is a training run that has saved no model: still training, stopped (continue it: "
                    f"python vldac.py --resume {model_id}) or run with --no-save-model")
        if not any((path / name).exists() for name in ("config.json", "adapter_config.json")):
            return f"{model_id} holds no model (no config.json or adapter_config.json)"
    elif model_id.startswith((".", "/", "~")) or model_id.count("/") != 1:
        return f"no such directory: {model_id}"
    elif hub_offline():
        return f"{model_id} is not in the local hub cache, and the hub cannot be reached"
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"cannot load {model_id} ({reason})"


@functools.lru_cache(maxsize=None)
def hub_offline():
    """True when the hub cannot be reached: a 3 s check instead of from_pretrained's minutes of retries."""
    if hub_constants.HF_HUB_OFFLINE:
        return True
    try:
        socket.create_connection((urlparse(hub_constants.ENDPOINT).hostname, 443), timeout=3).close()
        return False
    except OSError:
        return True


def resolve(model_id, env_id):
    """The directory or hub id to load: `tiny` is the shipped tiny model of env_id's family (models/)."""
    if model_id != "tiny":
        return model_dir(model_id)
    try:
        return tiny_vlm.tiny_model_path(tiny_vlm.family_of(env_id))
    except tiny_vlm.FramesDiffer as e:
        fail(str(e))


def locate(model_id, env_id):
    """resolve(), refusing in one line, before anything loads, a directory that holds no model or a path that does
    not exist (a hub id is looked up when it loads)."""
    path = Path(resolve(model_id, env_id)).expanduser()
    holds_model = any((path / name).exists() for name in ("config.json", "adapter_config.json"))
    if (path.is_dir() and not holds_model) or (not path.exists() and (model_id.startswith((".", "/", "~"))
                                                                      or model_id.count("/") != 1)):
        fail(f"{why_not_loadable(str(path), None)}; models: `tiny`, a local directory, a run directory or a hub id")
    return str(path)


def load_policy(model_id, device="cpu", lora_r=0, lora_alpha=32, lora_dropout=0.0, env_id="gym_cards/NumberLine-v0",
                bf16=None, trainable=True):
    """(model, processor) for `tiny` (the one that reads env_id), a local directory, a hub id, or a vldac
    checkpoint (full weights, or a peft adapter directory whose base is loaded first). The vision tower is
    frozen; with lora_r > 0 a LoRA adapter is put on the language model's projections (a loaded adapter keeps
    its own). bf16 (None: on CUDA) loads the weights in bf16 and keeps the TRAINABLE ones in fp32, so that Adam's
    steps and moments are not rounded to bf16's 8 bits; forwards then run under rollout.compute_context (autocast).
    trainable=False (evaluation): every weight frozen and in the loading dtype."""
    path = resolve(model_id, env_id)
    bf16 = torch.device(device).type == "cuda" if bf16 is None else bf16
    dtype = torch.bfloat16 if bf16 else torch.float32

    def local_only(name):  # a local directory, or the hub cache when the hub cannot be reached
        return Path(name).exists() or hub_offline()

    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=local_only(path))
        if (Path(path) / "adapter_config.json").exists():
            base = PeftConfig.from_pretrained(path).base_model_name_or_path
            model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype, local_files_only=local_only(base))
            model = PeftModel.from_pretrained(model, path, is_trainable=trainable)
        else:
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=local_only(path))
    except (OSError, ValueError) as e:
        fail(f"{why_not_loadable(model_id, e)}; models: `tiny`, a local directory, a run directory or a hub id")
    return prepare_policy(model, lora_r, lora_alpha, lora_dropout, trainable).to(device), processor


def prepare_policy(model, lora_r=0, lora_alpha=32, lora_dropout=0.0, trainable=True):
    """Freeze the vision tower (everything, if not trainable), add a LoRA adapter (lora_r > 0), and keep the
    trainable weights in fp32 (fp32 master weights, hence fp32 Adam state, whatever dtype the rest has)."""
    for name, param in model.named_parameters():
        if not trainable or any(part in name for part in VISION_TOWER):
            param.requires_grad_(False)
    if trainable and lora_r > 0 and not isinstance(model, PeftModel):
        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=LORA_TARGETS)
        model = get_peft_model(model, config)  # only the adapter is trainable
    for param in model.parameters():
        if param.requires_grad:  # a no-op when loaded in fp32
            param.data = param.data.float()
    return model
