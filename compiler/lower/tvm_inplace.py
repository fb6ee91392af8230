"""Cache writes in place for TVM: `index_put(cache, indices, values)` -> a scatter into `cache` itself.

Relax is functional: `R.index_put` returns a new tensor, so every step copied each layer's whole K
and V cache (23.6 MB a step for SmolLM2-135M at 512 slots) to change T rows of it. A step graph
takes each cache as an argument and returns its updated version, which the runtime keeps as the
next call's cache and never reads the old one again; so writing into the argument is safe where
the function itself does not read the argument after the write. `write_caches_in_place` rewrites
exactly those calls into `R.call_tir_inplace` of a scatter that touches only the written elements.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm import tirx as tir
from tvm.script import from_source

INDEX_PUT = tvm.ir.Op.get("relax.index_put")
OPAQUE = 8  # TIR op pattern kOpaque: FuseOps leaves the scatter alone


def shape_script(shape: relax.ShapeExpr, symbols: dict[str, str]) -> str:
    """A shape as TVMScript, symbolic dims named after their variables (declared by the caller)."""
    names = []
    for dim in shape.values:
        if isinstance(dim, tir.IntImm):
            names.append(str(int(dim)))
        else:
            names.append(symbols.setdefault(str(dim), f"n{len(symbols)}"))
    return "(" + ", ".join(names) + ("," if len(names) == 1 else "") + ")"


def scatter_function(data: relax.TensorType, indices: list[relax.TensorType],
                     values: relax.TensorType) -> tir.PrimFunc:  # fmt: skip
    """`data[i0[...], ..., iN[...]] = values[...]` in place, index tensors broadcast to the values'
    shape (a dim of 1 broadcasts; negative indices count from the end, as in torch)."""
    symbols: dict[str, str] = {}
    value_dims = shape_script(values.shape, symbols)
    rank = len(values.shape.values)
    loop_vars = [f"a{axis}" for axis in range(rank)]
    lines = [f"    data = T.match_buffer(var_data, {shape_script(data.shape, symbols)}, '{data.dtype}')",
             f"    values = T.match_buffer(var_values, {value_dims}, '{values.dtype}')"]  # fmt: skip
    subscripts = []
    for k, index in enumerate(indices):
        index_dims = shape_script(index.shape, symbols)
        lines.append(f"    i{k} = T.match_buffer(var_i{k}, {index_dims}, '{index.dtype}')")
        at = ", ".join("0" if _is_one(d) else loop_vars[axis] for axis, d in enumerate(index.shape.values))
        extent = data.shape.values[k]
        subscripts.append(f"T.if_then_else(i{k}[{at}] < 0, i{k}[{at}] + T.int64({extent}), i{k}[{at}])")
    arguments = ", ".join(["var_data: T.handle", *(f"var_i{k}: T.handle" for k in range(len(indices))),
                           "var_values: T.handle"])  # fmt: skip
    declared = [f"    {name} = T.int64()" for name in symbols.values()]
    source = "\n".join([
        "@T.prim_func(private=True)",
        f"def scatter({arguments}):",
        f"    T.func_attr({{'tirx.noalias': True, 'tirx.is_scheduled': True, 'op_pattern': {OPAQUE}}})",
        *declared, *lines,
        f"    for {', '.join(loop_vars)} in T.grid(*{value_dims}):",
        f"        data[{', '.join(subscripts)}] = values[{', '.join(loop_vars)}]",
    ])  # fmt: skip
    return from_source(source)


def _is_one(dim: tir.PrimExpr) -> bool:
    return isinstance(dim, tir.IntImm) and int(dim) == 1


def _eligible(call: relax.Call) -> bool:
    if not isinstance(call, relax.Call) or call.op != INDEX_PUT or bool(call.attrs.accumulate):
        return False
    data, indices, values = call.args
    return (isinstance(indices, relax.Tuple) and len(indices.fields) == len(data.ty.shape.values)
            and all(isinstance(i.ty.shape, relax.ShapeExpr) for i in indices.fields)
            and isinstance(values.ty.shape, relax.ShapeExpr))  # fmt: skip


def _bindings(function: relax.Function) -> list[relax.Binding]:
    return [binding for block in function.body.blocks for binding in block.bindings]


def in_place_writes(function: relax.Function) -> set[relax.Var]:
    """Bindings `x = index_put(p, ...)` of a parameter `p` that nothing reads after that binding."""
    params = set(function.params)
    bindings = _bindings(function)
    chosen = set()
    for position, binding in enumerate(bindings):
        if not _eligible(binding.value) or binding.value.args[0] not in params:
            continue
        data = binding.value.args[0]
        later = [b.value for b in bindings[position + 1 :]] + [function.body.body]
        if not any(data in relax.analysis.free_vars(value) for value in later):
            chosen.add(binding.var)
    return chosen


@relax.expr_functor.mutator
class _InPlaceWriter(relax.PyExprMutator):
    def __init__(self, module: tvm.IRModule, chosen: set[relax.Var]):
        super().__init__(module)
        self.chosen = chosen
        self.functions: dict[str, relax.GlobalVar] = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var not in self.chosen:
            return super().visit_var_binding_(binding)
        data, indices, values = binding.value.args
        scatter = scatter_function(data.ty, [i.ty for i in indices.fields],
                                   values.ty)  # fmt: skip
        key = str(scatter)
        if key not in self.functions:
            self.functions[key] = self.builder_.add_func(scatter, "index_put_in_place")
        arguments = [self.visit_expr(data), *(self.visit_expr(i) for i in indices.fields),
                     self.visit_expr(values)]  # fmt: skip
        call = relax.call_tir_inplace(self.functions[key], arguments, inplace_indices=[0],
                                      out_ty=binding.var.ty)  # fmt: skip
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(call)))

    def rewrite(self) -> tvm.IRModule:
        for global_var, function in self.builder_.get().functions_items():
            if isinstance(function, relax.Function):
                self.builder_.update_func(global_var, self.visit_expr(function))
        return self.builder_.get()


def write_caches_in_place(module: tvm.IRModule) -> tvm.IRModule:
    """Every Relax function's eligible cache writes (see `in_place_writes`) as in-place scatters."""
    chosen = set()
    for function in module.functions.values():
        if isinstance(function, relax.Function):
            chosen |= in_place_writes(function)
    return _InPlaceWriter(module, chosen).rewrite() if chosen else module
