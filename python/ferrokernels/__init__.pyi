from typing import Any, List, Optional, Sequence, Tuple, Union

from ._native import (CompileError as CompileError, CudaError as CudaError, DeviceError as DeviceError,
                      DTypeError as DTypeError, LayoutError as LayoutError, ShapeError as ShapeError)

__version__: str

Window = Optional[Sequence[Optional[int]]]

def attention(q: Any, k: Any, v: Any, *, causal: bool = False, scale: Optional[float] = None,
              window: Window = None, softcap: Optional[float] = None, alibi_slopes: Any = None,
              return_lse: bool = False, out: Any = None) -> Union[Any, Tuple[Any, Any]]: ...
def attention_varlen(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, max_seqlen_q: int,
                     max_seqlen_k: int, *, causal: bool = False, scale: Optional[float] = None,
                     window: Window = None, softcap: Optional[float] = None, alibi_slopes: Any = None,
                     return_lse: bool = False, out: Any = None) -> Union[Any, Tuple[Any, Any]]: ...
def sdpa(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
         is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False) -> Any: ...
def decode_attention(q: Any, k_cache: Any, v_cache: Any, cache_seqlens: Any, *, block_table: Any = None,
                     cache_leftpad: Any = None, causal_q: bool = True, scale: Optional[float] = None, softcap: Optional[float] = None,
                     window: Union[int, Window] = None, return_lse: bool = False, out: Any = None,
                     validate: bool = True) -> Union[Any, Tuple[Any, Any]]: ...
def append_kv(k_new: Any, v_new: Any, k_cache: Any, v_cache: Any, cache_seqlens: Any, block_table: Any = None, *,
              rotary: Optional[Tuple[Any, Any]] = None, rotary_interleaved: bool = False,
              validate: bool = True) -> None: ...
from .kvcache import PagedKVCache as PagedKVCache, VirtualKVCache as VirtualKVCache
from .sparse import BlockMask as BlockMask, sparse_attention as sparse_attention
def info() -> dict: ...
def compile_all(archs: Optional[List[str]] = None, progress: bool = False) -> List[dict]: ...
def kernel_names(arch: Optional[str] = None) -> List[str]: ...
def quant_attention(q: Any, k: Any, v: Any, *, causal: bool = False, qk: str = "int8", pv: str = "fp8",
                    smooth_k: bool = True, smooth_v: bool = False, balance_qk: bool = True,
                    scale: Optional[float] = None, return_lse: bool = False) -> Any: ...
def quant_attention_varlen(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, max_seqlen_q: int,
                           max_seqlen_k: int, *, causal: bool = False, qk: str = "int8", pv: str = "fp8",
                           smooth_k: bool = True, smooth_v: bool = False, balance_qk: bool = True,
                           scale: Optional[float] = None, return_lse: bool = False) -> Any: ...
def patch(model: Any, attention: Optional[str] = "flash", kv_cache: Optional[str] = "paged",
          linear: Optional[str] = None, *, group_size: int = 128, skip: Sequence[str] = ("lm_head",),
          quant_layers: Optional[Sequence[int]] = None) -> Any: ...
def unpatch(model: Any) -> Any: ...
def fp8_attention(q: Any, k: Any, v: Any, descale_q: Any = None, descale_k: Any = None, descale_v: Any = None, *,
                  causal: bool = False, scale: Optional[float] = None, smooth_k: bool = True,
                  hadamard_qk: bool = False, return_lse: bool = False) -> Any: ...
