"""The GPU path, checked without a GPU: the train step lowered for CUDA on the CPU.

CI never has a GPU, so the code that only runs there (cuDNN flash attention, the segment
mask as a cuDNN bias, bf16 matmuls into the chunked loss) would otherwise go untested.
Lowering (tracing to StableHLO, not compiling) works for any platform, so these tests
lower the real train step for 'cuda' and read which kernels and shapes it asks for.
jax refuses to emit a cuDNN call unless it finds cuDNN installed; a fake version number
stands in for it, and `jax.default_backend` reports 'gpu' so that `attention='auto'`
decides as it would on a GPU.
"""

import collections
import re

import jax
import pytest

from configs import gpt2_medium, gpt2_small, llama_1b, llama_7b, tiny
from lm.experiments import bench

FWD = '__cudnn$fmhaSoftmax'
BWD = '__cudnn$fmhaSoftmaxBackward'
BIAS_FWD = '__cudnn$fmhaScaleBiasSoftmax'
BIAS_BWD = '__cudnn$fmhaScaleBiasSoftmaxBackward'


@pytest.fixture
def as_on_gpu(monkeypatch):
  from jax._src.cudnn import fused_attention_stablehlo  # What checks cuDNN's version.

  class FakeCudnn:
    @staticmethod
    def cudnn_get_version() -> int:
      return 91000  # 9.10

  monkeypatch.setattr(fused_attention_stablehlo, 'cuda_versions', FakeCudnn)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')


def _gpt2_shaped(loss_chunk=128, **model):
  """GPT-2-small's attention shape (head dim 64, T=1024) and vocab, two thin layers."""
  c = tiny.get_config()
  c.model.update(vocab_size=50304, d_model=128, num_heads=2, num_kv_heads=2, d_ff=256,
                 num_layers=2, dtype='bfloat16', attention='auto')
  c.loss.chunk = loss_chunk
  # AdamW: these checks read the model's matmuls, and optax's Muon orthogonalises its
  # updates in float32.
  c.optimizer.name = 'adamw'
  c.model.update(model)
  c.batch_size, c.seq_len = 2, 1024
  return c


def _cuda_text(config, devices=None) -> str:
  return bench.lower_step(config, devices=devices, platforms=('cuda',)).as_text()


def _calls(text: str) -> collections.Counter:
  return collections.Counter(re.findall(r'custom_call @([\w$]+)', text))


def _one_device():
  return jax.devices()[:1]  # Unsharded, so the cuDNN calls are not wrapped for SPMD.


@pytest.mark.parametrize('scan_layers, remat, fwd, bwd', [
    (False, False, 2, 2),  # One forward and one backward kernel per layer.
    (True, False, 1, 1),  # One of each, in the scanned layer body.
    (False, True, 4, 2),  # Remat runs each layer's forward again before its backward.
])
def test_auto_attention_is_cudnn_flash_attention_on_gpu(as_on_gpu, scan_layers, remat,
                                                        fwd, bwd):
  config = _gpt2_shaped(scan_layers=scan_layers, remat=remat)
  calls = _calls(_cuda_text(config, _one_device()))
  assert (calls[FWD], calls[BWD]) == (fwd, bwd), calls
  assert calls[BIAS_FWD] == 0  # Causality is cuDNN's own mask, not a T x T bias.


def test_xla_attention_setting_keeps_cudnn_out(as_on_gpu):
  calls = _calls(_cuda_text(_gpt2_shaped(attention='xla'), _one_device()))
  assert not any('cudnn' in name for name in calls), calls


def test_float32_compute_falls_back_to_xla_attention(as_on_gpu):
  # cuDNN's flash attention takes 16-bit inputs only; 'auto' must not hand it float32.
  calls = _calls(_cuda_text(_gpt2_shaped(dtype='float32'), _one_device()))
  assert not any('cudnn' in name for name in calls), calls


def test_segment_ids_reach_cudnn_as_a_bias(as_on_gpu):
  config = _gpt2_shaped()
  config.data.segment_ids = True
  calls = _calls(_cuda_text(config, _one_device()))
  assert (calls[BIAS_FWD], calls[BIAS_BWD], calls[FWD]) == (2, 2, 0), calls


def _dot_operand_types(text: str) -> list[tuple[str, ...]]:
  """The element types of both operands of every dot_general."""
  signatures = re.findall(r'stablehlo\.dot_general.*: \((tensor<[^)]*)\) ->', text)
  assert signatures, 'no dot_general found'
  return [tuple(re.findall(r'x([a-z]\w*)>', s)) for s in signatures]


def test_every_matmul_is_bf16_and_the_logits_are_never_whole(as_on_gpu):
  text = _cuda_text(_gpt2_shaped(), _one_device())
  assert set(_dot_operand_types(text)) == {('bf16', 'bf16')}
  b, t, v = 2, 1024, 50304
  assert f'tensor<{b}x{t}x{v}x' not in text  # Only 128-token chunks of the logits.
  # Control: the unchunked loss does build B x T x V logits, so the check can see them.
  assert f'tensor<{b}x{t}x{v}x' in _cuda_text(_gpt2_shaped(loss_chunk=0), _one_device())


@pytest.mark.parametrize('module', [gpt2_small, gpt2_medium, llama_1b, llama_7b])
def test_shipped_configs_lower_for_gpu_on_their_mesh(as_on_gpu, module):
  """Each shipped config's own attention shape, dtypes and mesh, cut to one layer: cuDNN
  accepts its head dim and sequence length, and the sharded step lowers for CUDA."""
  config = module.get_config()
  assert config.model.attention == 'auto'  # What a user gets, not a forced 'cudnn'.
  config.model.num_layers = 1
  config.batch_size = 8  # One sequence per device of the 8-device test mesh.
  text = _cuda_text(config)
  # On a mesh jax wraps each cuDNN call for the SPMD partitioner: forward and backward,
  # and with remat the forward again.
  assert _calls(text)['CustomSPMDPartitioning'] == 2 + config.model.remat
