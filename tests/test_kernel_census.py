"""benchmarks/kernel_census.py: the profiler's launches joined to the executed graph's IR and grouped."""

import pytest

from benchmarks.kernel_census import (
    ADAM,
    EMA,
    MOVES,
    NATIVE_CONV_FORWARD,
    OTHER,
    read_graph,
    read_launches,
    take_census,
)

# Excerpts in the form of a MindSpore 2.10 CPU run's 34_execute_*.ir and cpu_op_execute_timestamp_0.txt
IR = """\
  %8(CNode_12153) = TensorMove(%7) cnode_attrs: {is_dynamic_len: Bool(0)}
      : (<Tensor[Float32], (4, 1, 7, 7)>) -> (<Tensor[Float32], (4, 1, 7, 7)>)
      # Fullname with scope: (Default/TensorMove-op0)
  %15(CNode_11270) = Custom(%12, %14) primitive_attrs: {func_name: "/k/ddpm_kernels-1.so:ConvForward"}
      # Fullname with scope: (Default/Custom-op0)
      # In file /repo/ddpm/kernels/conv.py:63, 15~50/        return self.forward_op(x, weight, self.config)/
  %1015(success) = Adam(%para5_init_conv.weight, %para174_moment1.init_conv.weight) {instance name: opt}
      # Fullname with scope: (Default/Adam-op0)
  %1862(CNode_10661) = PrimFunc_Mul(%1858, %1861)
      # Fullname with scope: (Default/Mul-op7)
      # In file /repo/ddpm/ema.py:34, 28~48/    return ops.assign(shadow, shadow * decay + param * (1.0 - decay))/
  %1863(CNode_10662) = PrimFunc_Mul(%1859, %1860)
      # Fullname with scope: (Default/Mul-op8)
      # In file /repo/ddpm/diffusion.py:99, 15~113/
"""
LAUNCHES = """\
Default/TensorMove-op0;HostCpuOps;1796578395667791978,0.001,0 1796578395769881223,0.001,0
Default/Custom-op0;HostCpuOps;1796578395667791978,2.0,0 1796578395769881223,2.0,0
Default/Adam-op0;HostCpuOps;1796578395667791978,0.02,0 1796578395769881223,0.02,0
Default/Mul-op7;HostCpuOps;1796578395667791978,0.003,0 1796578395769881223,0.003,0
Default/Mul-op8;HostCpuOps;1796578395667791978,0.003,0 1796578395769881223,0.003,0
Expand/_SumExt/ReduceSum-op3;HostCpuOps;1796578395667791978,0.05,0 1796578395769881223,0.05,0
"""


def test_census_groups_kernels_by_symbol_primitive_and_source():
    census = take_census(read_graph(IR), read_launches(LAUNCHES), steps=2)
    assert dict(census.launches[NATIVE_CONV_FORWARD]) == {"Custom:ConvForward": 1}
    assert dict(census.launches[ADAM]) == {"Adam": 1}
    assert dict(census.launches[EMA]) == {"Mul": 1}  # by its source line, not its primitive
    assert dict(census.launches[MOVES]) == {"TensorMove": 1}
    assert dict(census.launches[OTHER]) == {"ReduceSum": 1}  # expanded: named by the profiler only
    assert census.ms[NATIVE_CONV_FORWARD] == pytest.approx(4.0)


def test_census_refuses_a_kernel_that_did_not_run_once_per_step():
    uneven = LAUNCHES.replace("Default/Mul-op8;HostCpuOps;", "Default/Mul-op8;HostCpuOps;1796578395667791970,0.003,0 ")
    with pytest.raises(ValueError, match="ran 3 times in 2 steps"):
        take_census(read_graph(IR), read_launches(uneven), steps=2)


def test_census_refuses_a_kernel_missing_from_the_graph():
    with pytest.raises(ValueError, match="not in the executed graph"):
        take_census(read_graph(IR), read_launches("Default/Sin-op0;HostCpuOps;1,0.1,0 2,0.1,0\n"), steps=2)
