//! stub
use super::policy::{Lru, Policy};
use super::trace::Trace;
#[derive(Default, Clone, Debug)]
pub struct KilnConfig { pub prefetch_budget_pages: u32, pub partition_pages: u32, pub window_requests: u64 }
pub struct KilnPolicy(Lru);
impl KilnPolicy { pub fn new(t: &Trace, c: usize, _k: &KilnConfig) -> Self { KilnPolicy(Lru::new(t.unique_pages(), c)) } }
impl Policy for KilnPolicy {
    fn name(&self) -> &'static str { "kiln" }
    fn contains(&self, p: u32) -> bool { self.0.contains(p) }
    fn access(&mut self, p: u32, pos: usize) -> bool { self.0.access(p, pos) }
    fn resident_pages(&self) -> usize { self.0.resident_pages() }
}
