//! Pages of the KV cache: [`KvPage`] (one physical page of the pool), [`PageTable`] (one sequence's
//! logical block → page map for one KV head, sparse because evicted blocks have no page) and the pool's
//! free list.
//!
//! A page is one layout block of one KV head: `block_size` tokens of K in the K pool and the same tokens
//! of V at the same index in the V pool. One block per page keeps eviction exact: S2 stripes are single
//! blocks every `vert_stride` blocks, so a page of several blocks would pin its unneeded neighbours.

use std::collections::BTreeMap;

/// A physical page of the KV cache's pool: `block_size` tokens x `head_dim` of one KV head, K and V.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KvPage(u32);

impl KvPage {
    /// The page's index in the pool: its K rows start at element `index * block_size * head_dim` of the
    /// K pool, its V rows at the same element of the V pool.
    pub fn index(self) -> u32 {
        self.0
    }
}

/// One sequence's resident pages for one KV head, by logical block (the block's index counted from the
/// sequence's start). Blocks that were evicted, or never stored because no future query needs them,
/// have no entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageTable {
    pages: BTreeMap<u32, KvPage>,
}

impl PageTable {
    /// The page holding logical block `block`, if it is resident.
    pub fn get(&self, block: u32) -> Option<KvPage> {
        self.pages.get(&block).copied()
    }
    /// Resident `(logical block, page)` pairs in ascending block order.
    pub fn resident(&self) -> impl Iterator<Item = (u32, KvPage)> + '_ {
        self.pages.iter().map(|(&b, &p)| (b, p))
    }
    /// Resident pages.
    pub fn len(&self) -> usize {
        self.pages.len()
    }
    /// Whether no page is resident.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
    pub(crate) fn insert(&mut self, block: u32, page: KvPage) {
        self.pages.insert(block, page);
    }
    pub(crate) fn remove(&mut self, block: u32) -> Option<KvPage> {
        self.pages.remove(&block)
    }
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = KvPage> + '_ {
        std::mem::take(&mut self.pages).into_values()
    }
}

/// The pool's free list. Pages are handed out lowest index first.
#[derive(Debug)]
pub(crate) struct PagePool {
    free: Vec<u32>,
    capacity: u32,
}

impl PagePool {
    pub(crate) fn new(capacity: u32) -> Self {
        Self { free: (0..capacity).rev().collect(), capacity }
    }
    pub(crate) fn alloc(&mut self) -> Option<KvPage> {
        self.free.pop().map(KvPage)
    }
    pub(crate) fn release(&mut self, page: KvPage) {
        debug_assert!(page.0 < self.capacity && !self.free.contains(&page.0), "page {page:?} released twice");
        self.free.push(page.0);
    }
    pub(crate) fn free(&self) -> u32 {
        self.free.len() as u32
    }
    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }
}
