"""`--profile`'s breakdown of a step by kind of operation (vit_jax.benchmark.step_profile)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.benchmark import step_profile

_HLO = """\
HloModule m, entry_computation_layout={(f32[4,8,8]{2,1,0})->f32[4,8,8]{2,1,0}}

%fused_bmm (p0: f32[4,8,8], p1: f32[4,8,8]) -> f32[4,8,8] {
  %p0 = f32[4,8,8]{2,1,0} parameter(0)
  %p1 = f32[4,8,8]{2,1,0} parameter(1)
  %dot.1 = f32[4,8,8]{2,1,0} dot(%p0, %p1), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
  ROOT %exponential.1 = f32[4,8,8]{2,1,0} exponential(%dot.1)
}

%fused_dense (p0.1: f32[32,8], p1.1: f32[8,8]) -> f32[32,8] {
  %p0.1 = f32[32,8]{1,0} parameter(0)
  %p1.1 = f32[8,8]{1,0} parameter(1)
  ROOT %dot.2 = f32[32,8]{1,0} dot(%p0.1, %p1.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_outer (p0.2: f32[32,8], p1.2: f32[8,8]) -> f32[32,8] {
  %p0.2 = f32[32,8]{1,0} parameter(0)
  %p1.2 = f32[8,8]{1,0} parameter(1)
  ROOT %inner = f32[32,8]{1,0} fusion(%p0.2, %p1.2), kind=kOutput, calls=%fused_dense
}

%fused_transpose (p0.3: f32[4,8,8]) -> f32[4,8,8] {
  %p0.3 = f32[4,8,8]{2,1,0} parameter(0)
  %transpose.1 = f32[4,8,8]{2,1,0} transpose(%p0.3), dimensions={0,2,1}
  ROOT %copy.1 = f32[4,8,8]{2,1,0} copy(%transpose.1)
}

%fused_dus (p0.5: f32[4,8,8], p1.5: f32[1,8,8], p2.5: s32[]) -> f32[4,8,8] {
  %p0.5 = f32[4,8,8]{2,1,0} parameter(0)
  %p1.5 = f32[1,8,8]{2,1,0} parameter(1)
  %p2.5 = s32[] parameter(2)
  %constant.2 = s32[] constant(1)
  %add.2 = s32[] add(%p2.5, %constant.2)
  %constant.3 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = f32[4,8,8]{2,1,0} dynamic-update-slice(%p0.5, %p1.5, %add.2, %constant.3, %constant.3)
}

%fused_scalar (p0.6: f32[]) -> f32[] {
  %p0.6 = f32[] parameter(0)
  ROOT %sqrt.1 = f32[] sqrt(%p0.6)
}

%fused_add (p0.4: f32[4,8,8]) -> f32[4,8,8] {
  %p0.4 = f32[4,8,8]{2,1,0} parameter(0)
  %constant.1 = f32[] constant(1)
  %broadcast.1 = f32[4,8,8]{2,1,0} broadcast(%constant.1), dimensions={}
  ROOT %add.1 = f32[4,8,8]{2,1,0} add(%p0.4, %broadcast.1)
}

ENTRY %main (x: f32[4,8,8], w: f32[32,8], v: f32[8,8], i: s32[], s: f32[]) -> (f32[4,8,8], f32[32,8]) {
  %x = f32[4,8,8]{2,1,0} parameter(0)
  %w = f32[32,8]{1,0} parameter(1)
  %v = f32[8,8]{1,0} parameter(2)
  %attention_fusion = f32[4,8,8]{2,1,0} fusion(%x, %x), kind=kCustom, calls=%fused_bmm, metadata={op_name="jit(f)/Block/MultiHeadDotProductAttention_0/dot_general"}
  %matmul_fusion = f32[32,8]{1,0} fusion(%w, %v), kind=kCustom, calls=%fused_outer
  %copy_fusion = f32[4,8,8]{2,1,0} fusion(%attention_fusion), kind=kLoop, calls=%fused_transpose
  %add_fusion = f32[4,8,8]{2,1,0} fusion(%copy_fusion), kind=kLoop, calls=%fused_add
  %i = s32[] parameter(3)
  %slice.1 = f32[1,8,8]{2,1,0} slice(%x), slice={[0:1], [0:8], [0:8]}
  %dus_fusion = f32[4,8,8]{2,1,0} fusion(%x, %slice.1, %i), kind=kLoop, calls=%fused_dus
  %s = f32[] parameter(4)
  %scalar_fusion = f32[] fusion(%s), kind=kLoop, calls=%fused_scalar
  %dot.3 = f32[32,8]{1,0} dot(%w, %v), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %tuple = (f32[4,8,8]{2,1,0}, f32[32,8]{1,0}) tuple(%add_fusion, %matmul_fusion)
}
"""


def test_each_operation_gets_the_category_of_what_it_contains():
  instructions, computations = step_profile._parse_hlo(_HLO)
  category = lambda name: step_profile._category(name, instructions, computations)  # noqa: E731
  assert category('attention_fusion') == 'attention'  # a batched dot (and its softmax)
  assert category('matmul_fusion') == 'matmul'  # a dot inside a nested fusion
  assert category('dot.3') == 'matmul'
  assert category('copy_fusion') == 'copies'
  assert category('dus_fusion') == 'copies'  # its index arithmetic is on scalars
  assert category('add_fusion') == 'elementwise'
  assert category('scalar_fusion') == 'elementwise'  # only scalars, but not a copy
  assert step_profile._source(instructions['attention_fusion'][1]) == (
      'Block/MultiHeadDotProductAttention_0/dot_general')


def test_time_of_overlapping_operations_is_shared_as_a_fine_grid_shares_it():
  rng = np.random.default_rng(0)
  starts = rng.integers(0, 900, 40)
  events = [{'name': f'op{i % 13}', 'ts': int(s), 'dur': int(d)}
            for i, (s, d) in enumerate(zip(starts, rng.integers(1, 200, 40)))]
  shared = step_profile._shared_wall_time(events)
  # Independently: each microsecond of the span, split among the events covering it.
  expected = {}
  for t in range(1200):
    covering = [e['name'] for e in events if e['ts'] <= t < e['ts'] + e['dur']]
    for name in covering:
      expected[name] = expected.get(name, 0.0) + 1 / len(covering)
  assert set(shared) == set(expected)
  for name, micros in expected.items():
    assert shared[name] == pytest.approx(micros, abs=1e-6)
  busy = sum(1 for t in range(1200)
             if any(e['ts'] <= t < e['ts'] + e['dur'] for e in events))
  assert sum(shared.values()) == pytest.approx(busy)


def test_xla_breakdown_of_a_step_with_a_matmul_attention_and_elementwise_work():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((48, 197, 64), np.float32))
  w = jnp.asarray(rng.standard_normal((1024, 1024), np.float32))
  x = jnp.asarray(rng.standard_normal((512, 1024), np.float32))

  @jax.jit
  def f(q, w, x):
    scores = jnp.einsum('bqd,bkd->bqk', q, q)
    return jnp.tanh(jnp.sin(scores) * 3 + 1).sum() + (x @ w).sum()

  compiled = f.lower(q, w, x).compile()
  r = step_profile.xla_breakdown(lambda: jax.block_until_ready(compiled(q, w, x)),
                                 compiled.as_text(), steps=3)
  assert r['steps'] == 3 and set(r['seconds']) == {*step_profile.CATEGORIES,
                                                    step_profile.OUTSIDE}
  for kind in ('matmul', 'attention', 'elementwise'):
    assert r['seconds'][kind] > 0, r
  assert sum(r['seconds'].values()) == pytest.approx(r['wall_s'], rel=1e-6)
  categories = {op['category'] for op in r['top_ops']}
  assert {'matmul', 'attention'} <= categories, r['top_ops']
  assert all(op['calls'] >= 1 and op['seconds'] > 0 for op in r['top_ops'])
  lines = step_profile.format_table({'vit_jax': r})
  assert any(line.split()[:1] == ['attention'] for line in lines), lines


@pytest.mark.parametrize('op_name, part', [
    ('jit(train_step)/jvp(VisionTransformer)/Transformer/Transformer._scanned/while/body/'
     'closed_call/encoderblock/encoderblock._forward/MlpBlock_0/Dense_1/dot_general',
     ('Transformer/encoderblock/MlpBlock_0', 'forward')),
    ('jit(train_step)/transpose(jvp(VisionTransformer))/Transformer/Transformer._scanned/'
     'while/body/closed_call/checkpoint/rematted_computation/encoderblock/'
     'encoderblock._forward/LayerNorm_0/reduce_sum',
     ('Transformer/encoderblock/LayerNorm_0', 'recomputed')),
    ('jit(train_step)/transpose(jvp(VisionTransformer))/Transformer/encoderblock_11/'
     'MultiHeadDotProductAttention_0/query/dot_general',
     ('Transformer/encoderblock/MultiHeadDotProductAttention_0', 'backward')),
    ('jit(train_step)/transpose(jvp(VisionTransformer))/Transformer/Transformer._scanned/'
     'while/body/jit(dynamic_update_index_in_dim)/dynamic_update_slice',
     ('Transformer' + step_profile.SCAN_LOOP, 'backward')),
    ('jit(<lambda>)/VisionTransformer/Transformer/encoderblock_3/encoderblock_3._forward/'
     'MlpBlock_0/Dense_0/dot_general', ('Transformer/encoderblock/MlpBlock_0', 'forward')),
    ('jit(train_step)/jvp(ResNetV1)/layer1/block_0/block_0.finish/conv_proj/conv',
     ('layer1/block/conv_proj', 'forward')),
    ('jit(train_step)/transpose(jvp(VisionTransformer))/block1/unit02/gn1/reduce_sum',
     ('block1/unit/gn1', 'backward')),
    ('jit(train_step)/jvp(SwinTransformer)/layers_2/blocks_1/norm2/mul',
     ('layers_2/blocks/norm2', 'forward')),
    ('jit(train_step)/transpose(jvp(VisionTransformer))/Transformer/jvp(VisionTransformer)/'
     'Transformer/checkpoint/encoderblock_1/encoderblock_1._forward/MlpBlock_0/Dense_1/'
     'cond/branch_0_fun/transpose', ('Transformer/encoderblock/MlpBlock_0', 'backward')),
    ('jit(train_step)/jvp(VisionTransformer)/Transformer/Transformer._scan_over_blocks/while/'
     'body/closed_call/encoderblock/encoderblock._forward/MlpBlock_0/Dense_1/dot_general',
     ('Transformer/encoderblock/MlpBlock_0', 'forward')),
    ('jit(train_step)/jvp(Res2Net)/layer3/block_4/convs_2/conv', ('layer3/block/convs', 'forward')),
    ('jit(train_step)/jvp(SwinTransformer)/layers_1/downsample/reduction/dot_general',
     ('layers_1/downsample/reduction', 'forward')),
    ('jit(train_step)/jvp(VisionTransformer)/add', ('VisionTransformer', 'forward')),
    ('jit(train_step)/jit(clip)/min', (step_profile.OUTSIDE_MODEL, '')),
    ('', (step_profile.NO_SOURCE, '')),
])
def test_each_operation_is_put_in_the_part_of_the_model_it_comes_from(op_name, part):
  rest = f'%x), metadata={{op_name="{op_name}" stack_frame_id=3}}' if op_name else '%x)'
  assert step_profile._part(rest) == part  # pylint: disable=protected-access


def test_torch_breakdown_puts_aten_operations_in_the_same_categories():
  from vit_jax import torch_import  # pylint: disable=g-import-not-at-top
  torch = torch_import.torch()
  a = torch.randn(256, 512)
  b = torch.randn(512, 512)
  q = torch.randn(8, 64, 32)

  def step():
    (a @ b).relu()
    torch.nn.functional.scaled_dot_product_attention(q, q, q)
    q.transpose(1, 2).contiguous()

  r = step_profile.torch_breakdown(torch, step, steps=2)
  for kind in ('matmul', 'attention', 'elementwise', 'copies'):
    assert r['seconds'][kind] > 0, r
  assert sum(r['seconds'].values()) == pytest.approx(r['wall_s'], rel=1e-6)
  by_op = {op['op']: op['category'] for op in r['top_ops']}
  assert by_op.get('aten::mm') == 'matmul', by_op
  assert by_op.get('aten::relu') in (None, 'elementwise')


def test_torch_convolutions_of_every_kernel_count_as_matmul():
  """Under bf16 autocast on a CPU, PyTorch runs a convolution (timm's patch embedding) as
  aten::_slow_conv2d_forward/_backward, which counted as elementwise."""
  from vit_jax import torch_import  # pylint: disable=g-import-not-at-top
  torch = torch_import.torch()
  for name in ('aten::_slow_conv2d_forward', 'aten::_slow_conv2d_backward',
               'aten::mkldnn_convolution', 'aten::convolution_backward'):
    assert step_profile._torch_category(name) == 'matmul', name
  conv = torch.nn.Conv2d(3, 32, 8, stride=8)
  x = torch.randn(2, 3, 32, 32)

  def step():
    with torch.autocast('cpu', dtype=torch.bfloat16):
      conv(x).float().sum().backward()

  r = step_profile.torch_breakdown(torch, step, steps=2)
  convs = {op['op']: op['category'] for op in r['top_ops'] if 'conv' in op['op']}
  assert convs and set(convs.values()) == {'matmul'}, convs


def test_an_inference_step_has_no_backward_or_recomputed_time_per_part():
  """They showed 0.000 s for every part of an inference profile: a pass the step does not
  have is None ('-' in the table); a part's pass that ran stays a number, 0 where the
  part had none of it."""
  parts = {'block 0': {'forward': 0.2}, 'head': {'forward': 0.1}, '': {'': 0.05}}
  r = step_profile._record({'matmul': 0.3}, 0.4, 1, [], parts)
  by_part = {p['part']: p for p in r['parts']}
  assert by_part['block 0']['forward'] == pytest.approx(0.2)
  assert by_part['block 0']['backward'] is None and by_part['head']['recomputed'] is None
  trained = step_profile._record({'matmul': 0.3}, 0.4, 1, [],
                                 {'block 0': {'forward': 0.2, 'backward': 0.4},
                                  'head': {'forward': 0.1}})
  by_part = {p['part']: p for p in trained['parts']}
  assert by_part['head']['backward'] == 0.0 and by_part['block 0']['recomputed'] is None
