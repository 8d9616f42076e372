"""What the Triton test files share (not a test module: pytest does not collect it): a kernel's
build for an H100/H200 (sm_90) without a GPU, with Triton's own ptxas."""

import pytest


def sm90_ptx(fn, signature: dict, constexprs: dict) -> str:
    """The PTX of the jitted `fn` for sm_90; the constexprs named by a parameter join the signature as
    such (one keyed (parameter index, member) is a tuple's member: 'constexpr' in the signature's
    tuple already). Skips the test on a triton build without its CUDA toolchain."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception as e:
        pytest.skip(f"triton has no ptxas here: {e}")
    sig = signature | {k: "constexpr" for k in constexprs if isinstance(k, str)}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32)).asm[
        "ptx"
    ]
