"""The bundled demo model: a small pixel-space, class-conditional ComfyUI UNet (DESIGN.md §6).

It is ComfyUI's own `UNetModel` (the SD1.5 architecture) at 32-32-64 channels on 32×32 RGB images, a
V-prediction model on ComfyUI's default discrete schedule (scaled-linear betas 0.00085..0.012, 1000 steps), trained
by `scripts/train_demo_model.py` on `demo_dataset`. Its "latent" is the image in [-1, 1]: the stock
`pixel_space` VAE (VAELoader) encodes and decodes it, and the latent format is ComfyUI's 3-channel
identity format (`ChromaRadiance`).

Conditioning is a single cross-attention token: a one-hot class vector (padded to CONTEXT_DIM), which
also feeds the UNet's label embedding (`y`, added to the time embedding). The all-zero token is the unconditional "null class" the model was trained on with CFG dropout, so
ComfyUI's stock ConditioningZeroOut of any class conditioning is the uncond.

Position channels (pixel coordinates and their Fourier features) are concatenated to the input
through ComfyUI's `c_concat`, as inpainting models get their mask: a convolutional UNet sees no
absolute position otherwise (one-token attention is spatially constant too), so painting a fixed
training image from noise took it far longer than a few CPU minutes.
"""

from __future__ import annotations

import json
import pathlib

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
import safetensors.torch
import torch

from .demo_dataset import CLASS_NAMES, IMAGE_SIZE, class_index

WEIGHTS_PATH = pathlib.Path(__file__).resolve().parent / "weights" / "demo_unet.safetensors"
CONTEXT_DIM = 16
FORMAT_VERSION = "2"
POSITION_FREQUENCIES = (1, 2, 4, 8)  # sin/cos(π·k·u) of the coordinates u ∈ [-1, 1]
POSITION_CHANNELS = 2 + 4 * len(POSITION_FREQUENCIES)
# V-prediction: an EPS model of this size, trained for minutes, mispredicts the image at the schedule's
# top noise levels (σ up to 14.6: x0 = x − σ·ε amplifies ε errors by σ) and its samples come out noisy.
PREDICTION = comfy.model_base.ModelType.V_PREDICTION


def v_target(clean: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The network output for which ComfyUI's V_PREDICTION `calculate_denoised` returns `clean` from
    x = clean + σ·noise: v = (noise − σ·clean)/√(σ² + 1) (σ_data = 1)."""
    sigma = sigma.reshape(-1, 1, 1, 1)
    return (noise - sigma * clean) / (sigma * sigma + 1.0).sqrt()


DEMO_UNET_CONFIG = {
    "image_size": IMAGE_SIZE,
    "in_channels": 3 + POSITION_CHANNELS,
    "out_channels": 3,
    "model_channels": 32,
    "num_res_blocks": 1,
    # FiLM: the time and class embedding scale and shift the features after GroupNorm. Added before it
    # (the default), a per-channel bias is erased by GroupNorm's 32 groups at 32 channels (one channel
    # per group): the class then barely reached the network and nothing got memorized.
    "use_scale_shift_norm": True,
    # 32 channels at 16×16 as at 32×32 (GroupNorm's 32 groups make 32 the narrowest level): a 1.4×
    # faster training step than 1-2-2 on CPU, and ample capacity for four memorized images
    "channel_mult": [1, 1, 2],
    # attention at 16×16 and 8×8 (none at 32×32: most of its cost). At 8×8 only, the model drew rotated
    # squares as lumpy pentagons: four straight edges at one angle need the whole shape in view.
    "transformer_depth": [0, 1, 1],
    "transformer_depth_output": [0, 0, 1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "num_head_channels": 16,
    "context_dim": CONTEXT_DIM,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "legacy": False,
    # The class token also enters the time embedding (label_emb): a strong, cheap class signal at
    # every resolution; cross-attention alone barely moved the prediction in a short training run.
    "num_classes": "sequential",
    "adm_in_channels": CONTEXT_DIM,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


class DemoUNetConfig(comfy.supported_models_base.BASE):
    unet_config = {}
    unet_extra_config = {"num_heads": -1}
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.float32]

    def __init__(self):
        super().__init__(dict(DEMO_UNET_CONFIG))
        self.latent_format = comfy.latent_formats.ChromaRadiance()


class DemoBaseModel(comfy.model_base.BaseModel):
    """BaseModel whose `y` (label embedding input) is the class token of the cross-attention context,
    and whose input carries the position channels."""

    def encode_adm(self, **kwargs):
        cross_attn = kwargs.get("cross_attn")
        return None if cross_attn is None else class_vector(cross_attn)

    def concat_cond(self, **kwargs):
        noise = kwargs["noise"]
        return position_channels(noise.shape[-2], noise.shape[-1]).expand(noise.shape[0], -1, -1, -1)


def position_channels(height: int, width: int) -> torch.Tensor:
    """[1, POSITION_CHANNELS, H, W]: x and y in [-1, 1], then sin and cos of π·k·x and π·k·y."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    channels = [x, y]
    for frequency in POSITION_FREQUENCIES:
        for coordinate in (x, y):
            channels += [torch.sin(torch.pi * frequency * coordinate), torch.cos(torch.pi * frequency * coordinate)]
    return torch.stack(channels).unsqueeze(0)


def with_positions(scaled_input: torch.Tensor) -> torch.Tensor:
    """The network input as ComfyUI builds it (`_apply_model`: scaled x, then c_concat): for training."""
    positions = position_channels(*scaled_input.shape[-2:]).to(scaled_input)
    return torch.cat([scaled_input, positions.expand(scaled_input.shape[0], -1, -1, -1)], dim=1)


def class_vector(context: torch.Tensor) -> torch.Tensor:
    """The label-embedding input [B, CONTEXT_DIM] of a context [B, tokens, CONTEXT_DIM]: its first token."""
    return context[:, 0, :CONTEXT_DIM]


def build_demo_base_model() -> comfy.model_base.BaseModel:
    """The architecture with ComfyUI's uninitialised weights (fill them: `init_for_training` or a load)."""
    return DemoBaseModel(DemoUNetConfig(), model_type=PREDICTION, device=torch.device("cpu"))


@torch.no_grad()
def init_for_training(model: comfy.model_base.BaseModel, seed: int) -> None:
    """PyTorch's default initialisation (ComfyUI's layers skip it), with zeroed output layers as in
    the original UNet's `zero_module`, from a seeded generator."""
    torch.manual_seed(seed)
    for module in model.diffusion_model.modules():
        for base in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(module, base):
                base.reset_parameters(module)
                break
    for parameter in model.diffusion_model.out[
        -1
    ].parameters():  # the last conv only: a zeroed norm blocks every gradient
        parameter.zero_()


def save_weights(model: comfy.model_base.BaseModel, path: pathlib.Path, training_info: dict) -> None:
    metadata = {
        "format_version": FORMAT_VERSION,
        "class_names": json.dumps(list(CLASS_NAMES)),
        "unet_config": json.dumps(DEMO_UNET_CONFIG),
        "training": json.dumps(training_info),
    }
    # float16 on disk halves the file; loading casts back to the float32 model
    tensors = {name: tensor.detach().half().contiguous() for name, tensor in model.diffusion_model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def read_metadata(path: pathlib.Path = WEIGHTS_PATH) -> dict:
    with safetensors.safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_demo_model(path: pathlib.Path = WEIGHTS_PATH) -> comfy.model_patcher.ModelPatcher:
    """The trained demo model as a ComfyUI MODEL."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"demo model weights not found at {path}: run scripts/train_demo_model.py")
    metadata = read_metadata(path)
    if json.loads(metadata.get("unet_config", "{}")) != DEMO_UNET_CONFIG:
        raise ValueError(f"{path} was trained with another architecture than pixel_unet.DEMO_UNET_CONFIG: retrain it")
    if tuple(json.loads(metadata.get("class_names", "[]"))) != CLASS_NAMES:
        raise ValueError(f"{path} was trained on other classes than demo_dataset.CLASS_NAMES: retrain it")
    model = build_demo_base_model()
    state_dict = safetensors.torch.load_file(str(path))
    model.diffusion_model.load_state_dict(state_dict, strict=True)
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def class_context(class_ids: torch.Tensor | list[int]) -> torch.Tensor:
    """[B, 1, CONTEXT_DIM] one-hot tokens; an id of -1 gives the all-zero null (unconditional) token."""
    ids = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1)
    context = torch.zeros(ids.numel(), 1, CONTEXT_DIM)
    known = ids >= 0
    context[known.nonzero().flatten(), 0, ids[known]] = 1.0
    return context


def class_conditioning(name_or_index: str | int) -> list:
    """ComfyUI CONDITIONING for one demo class."""
    return [[class_context([class_index(name_or_index)]), {}]]


def null_conditioning() -> list:
    """ComfyUI CONDITIONING of the null class (what the model learned as unconditional)."""
    return [[class_context([-1]), {}]]
