//! Parameters by HuggingFace name: one visitor and one mapper that track the module path.
//!
//! burn's `ModuleVisitor`/`ModuleMapper` see a parameter without its name; the derive announces
//! every field (and every `Vec` index) with `enter_module`/`exit_module` around it. [`visit_named`]
//! and [`map_named`] keep that path and hand each float parameter over with its dotted name
//! (`model.layers.3.self_attn.o_proj.weight`, or `self_attn.o_proj.weight` inside a block), so the
//! code that freezes, copies, loads or inspects parameters by name states only what it does with
//! each one.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, backend::Backend};

/// Looks at every float parameter of a module with its name (see [`visit_named`]).
pub trait NamedVisitor<B: Backend> {
    /// Called once per float parameter, in module order.
    fn visit<const D: usize>(&mut self, name: &str, param: &Param<Tensor<B, D>>);
}

/// Replaces every float parameter of a module, knowing its name (see [`map_named`]).
pub trait NamedMapper<B: Backend> {
    /// Called once per float parameter, in module order; returns its replacement.
    fn map<const D: usize>(
        &mut self,
        name: &str,
        param: Param<Tensor<B, D>>,
    ) -> Param<Tensor<B, D>>;
}

/// Visit every float parameter of `module` with its dotted name.
pub fn visit_named<B: Backend, M: Module<B>, V: NamedVisitor<B>>(module: &M, visitor: &mut V) {
    module.visit(&mut Path {
        path: Vec::new(),
        inner: visitor,
    });
}

/// Map every float parameter of `module`, given its dotted name.
pub fn map_named<B: Backend, M: Module<B>, F: NamedMapper<B>>(module: M, mapper: &mut F) -> M {
    module.map(&mut Path {
        path: Vec::new(),
        inner: mapper,
    })
}

/// The module path while burn walks a module.
struct Path<'a, T> {
    path: Vec<String>,
    inner: &'a mut T,
}

impl<B: Backend, V: NamedVisitor<B>> ModuleVisitor<B> for Path<'_, V> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.inner.visit(&self.path.join("."), param);
    }
}

impl<B: Backend, F: NamedMapper<B>> ModuleMapper<B> for Path<'_, F> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        self.inner.map(&self.path.join("."), param)
    }
}
