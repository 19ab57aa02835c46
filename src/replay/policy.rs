//! Fast-tier placement policies over dense page ids, all behind one [`Policy`] trait.
//!
//! Demand policies (LRU, ARC, LIRS, S3-FIFO, SIEVE, Belady's MIN) admit a page into the fast tier
//! on a miss; every admission is one migrated page. Prefetching policies (Markov, kiln) may also
//! migrate pages ahead of access in [`Policy::after_request`], limited by a page budget.

use super::trace::Trace;
use std::collections::BinaryHeap;

/// "No page" marker in intrusive lists.
pub const NIL: u32 = u32::MAX;

/// A fast-tier placement policy, driven in virtual time by the replay harness.
pub trait Policy {
    /// Short name as used on the command line.
    fn name(&self) -> &'static str;
    /// Whether `page` is on the fast tier now.
    fn contains(&self, page: u32) -> bool;
    /// Demand access of `page`; `pos` is its index in the trace's flat page stream.
    /// Returns true when the page was migrated into the fast tier by this access.
    fn access(&mut self, page: u32, pos: usize) -> bool;
    /// Called once a request's pages were accessed; may migrate pages ahead of access.
    /// Returns the number of pages migrated.
    fn after_request(&mut self, _trace: &Trace, _req: usize) -> u64 {
        0
    }
    /// Pages on the fast tier.
    fn resident_pages(&self) -> usize;
}

/// Doubly linked lists threaded through per-page arrays; one page is in at most one list of a
/// given `Links`. Head is the newest entry, tail the oldest.
#[derive(Debug, Clone)]
pub struct Links {
    prev: Vec<u32>,
    next: Vec<u32>,
}

/// Head, tail and length of one list in a [`Links`].
#[derive(Debug, Clone, Copy)]
pub struct List {
    pub head: u32,
    pub tail: u32,
    pub len: usize,
}

impl Default for List {
    fn default() -> Self {
        List {
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }
}

impl Links {
    /// Links for pages `0..n`.
    pub fn new(n: usize) -> Self {
        Links {
            prev: vec![NIL; n],
            next: vec![NIL; n],
        }
    }

    /// Inserts `x` at the head of `l`.
    #[inline]
    pub fn push_head(&mut self, l: &mut List, x: u32) {
        let xi = x as usize;
        self.prev[xi] = NIL;
        self.next[xi] = l.head;
        if l.head != NIL {
            self.prev[l.head as usize] = x;
        } else {
            l.tail = x;
        }
        l.head = x;
        l.len += 1;
    }

    /// Unlinks `x` from `l`.
    #[inline]
    pub fn remove(&mut self, l: &mut List, x: u32) {
        let xi = x as usize;
        let (p, n) = (self.prev[xi], self.next[xi]);
        if p != NIL {
            self.next[p as usize] = n;
        } else {
            debug_assert_eq!(l.head, x);
            l.head = n;
        }
        if n != NIL {
            self.prev[n as usize] = p;
        } else {
            debug_assert_eq!(l.tail, x);
            l.tail = p;
        }
        self.prev[xi] = NIL;
        self.next[xi] = NIL;
        assert!(l.len > 0, "remove from an empty list");
        l.len -= 1;
    }

    /// Removes and returns the tail (oldest) of `l`.
    #[inline]
    pub fn pop_tail(&mut self, l: &mut List) -> Option<u32> {
        let t = l.tail;
        if t == NIL {
            return None;
        }
        self.remove(l, t);
        Some(t)
    }

    /// The entry after `x` toward the head (newer).
    #[inline]
    pub fn newer(&self, x: u32) -> u32 {
        self.prev[x as usize]
    }
}

/// Least recently used.
pub struct Lru {
    cap: usize,
    links: Links,
    list: List,
    resident: Vec<bool>,
}

impl Lru {
    pub fn new(n: usize, cap: usize) -> Self {
        assert!(cap > 0, "fast tier must hold at least one page");
        Lru {
            cap,
            links: Links::new(n),
            list: List::default(),
            resident: vec![false; n],
        }
    }

    /// Inserts a page that is not resident at the head, evicting the tail when full.
    pub fn insert(&mut self, page: u32) {
        debug_assert!(!self.resident[page as usize]);
        if self.list.len >= self.cap {
            let v = self
                .links
                .pop_tail(&mut self.list)
                .expect("full list has a tail");
            self.resident[v as usize] = false;
        }
        self.links.push_head(&mut self.list, page);
        self.resident[page as usize] = true;
    }
}

impl Policy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }
    fn contains(&self, page: u32) -> bool {
        self.resident[page as usize]
    }
    fn access(&mut self, page: u32, _pos: usize) -> bool {
        if self.resident[page as usize] {
            self.links.remove(&mut self.list, page);
            self.links.push_head(&mut self.list, page);
            false
        } else {
            self.insert(page);
            true
        }
    }
    fn resident_pages(&self) -> usize {
        self.list.len
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ArcWhere {
    None,
    T1,
    T2,
    B1,
    B2,
}

/// Adaptive replacement cache (Megiddo and Modha, FAST'03).
pub struct Arc {
    cap: usize,
    p: f64,
    links: Links,
    t1: List,
    t2: List,
    b1: List,
    b2: List,
    at: Vec<ArcWhere>,
}

impl Arc {
    pub fn new(n: usize, cap: usize) -> Self {
        assert!(cap > 0, "fast tier must hold at least one page");
        Arc {
            cap,
            p: 0.0,
            links: Links::new(n),
            t1: List::default(),
            t2: List::default(),
            b1: List::default(),
            b2: List::default(),
            at: vec![ArcWhere::None; n],
        }
    }

    fn list_mut(&mut self, w: ArcWhere) -> &mut List {
        match w {
            ArcWhere::T1 => &mut self.t1,
            ArcWhere::T2 => &mut self.t2,
            ArcWhere::B1 => &mut self.b1,
            ArcWhere::B2 => &mut self.b2,
            ArcWhere::None => unreachable!("page in no list"),
        }
    }

    fn move_to(&mut self, x: u32, to: ArcWhere) {
        let from = self.at[x as usize];
        if from != ArcWhere::None {
            let mut l = *self.list_mut(from);
            self.links.remove(&mut l, x);
            *self.list_mut(from) = l;
        }
        if to != ArcWhere::None {
            let mut l = *self.list_mut(to);
            self.links.push_head(&mut l, x);
            *self.list_mut(to) = l;
        }
        self.at[x as usize] = to;
    }

    fn replace(&mut self, in_b2: bool) {
        let t1 = self.t1.len as f64;
        if self.t1.len > 0 && (t1 > self.p || (in_b2 && t1 == self.p)) {
            let v = self.t1.tail;
            self.move_to(v, ArcWhere::B1);
        } else if self.t2.len > 0 {
            let v = self.t2.tail;
            self.move_to(v, ArcWhere::B2);
        } else {
            let v = self.t1.tail;
            self.move_to(v, ArcWhere::B1);
        }
    }
}

impl Policy for Arc {
    fn name(&self) -> &'static str {
        "arc"
    }
    fn contains(&self, page: u32) -> bool {
        matches!(self.at[page as usize], ArcWhere::T1 | ArcWhere::T2)
    }
    fn access(&mut self, x: u32, _pos: usize) -> bool {
        let c = self.cap;
        match self.at[x as usize] {
            ArcWhere::T1 | ArcWhere::T2 => {
                self.move_to(x, ArcWhere::T2);
                false
            }
            ArcWhere::B1 => {
                let d = if self.b1.len >= self.b2.len {
                    1.0
                } else {
                    self.b2.len as f64 / self.b1.len as f64
                };
                self.p = (self.p + d).min(c as f64);
                self.replace(false);
                self.move_to(x, ArcWhere::T2);
                true
            }
            ArcWhere::B2 => {
                let d = if self.b2.len >= self.b1.len {
                    1.0
                } else {
                    self.b1.len as f64 / self.b2.len as f64
                };
                self.p = (self.p - d).max(0.0);
                self.replace(true);
                self.move_to(x, ArcWhere::T2);
                true
            }
            ArcWhere::None => {
                let l1 = self.t1.len + self.b1.len;
                let total = l1 + self.t2.len + self.b2.len;
                if l1 == c {
                    if self.t1.len < c {
                        let v = self.b1.tail;
                        self.move_to(v, ArcWhere::None);
                        self.replace(false);
                    } else {
                        let v = self.t1.tail;
                        self.move_to(v, ArcWhere::None);
                    }
                } else if l1 < c && total >= c {
                    if total == 2 * c {
                        let v = self.b2.tail;
                        self.move_to(v, ArcWhere::None);
                    }
                    self.replace(false);
                }
                self.move_to(x, ArcWhere::T1);
                true
            }
        }
    }
    fn resident_pages(&self) -> usize {
        self.t1.len + self.t2.len
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum LirsState {
    None,
    Lir,
    HirResident,
    HirGhost,
}

/// LIRS (Jiang and Zhang, SIGMETRICS'02) with 1% of the tier for resident HIR pages.
pub struct Lirs {
    lir_cap: usize,
    hir_cap: usize,
    lir_len: usize,
    s_links: Links,
    q_links: Links,
    s: List,
    q: List,
    in_s: Vec<bool>,
    state: Vec<LirsState>,
}

impl Lirs {
    pub fn new(n: usize, cap: usize) -> Self {
        assert!(cap > 1, "LIRS needs at least two pages");
        let hir_cap = (cap / 100).max(1);
        Lirs {
            lir_cap: cap - hir_cap,
            hir_cap,
            lir_len: 0,
            s_links: Links::new(n),
            q_links: Links::new(n),
            s: List::default(),
            q: List::default(),
            in_s: vec![false; n],
            state: vec![LirsState::None; n],
        }
    }

    fn s_top(&mut self, x: u32) {
        if self.in_s[x as usize] {
            self.s_links.remove(&mut self.s, x);
        }
        self.s_links.push_head(&mut self.s, x);
        self.in_s[x as usize] = true;
    }

    fn prune(&mut self) {
        while self.s.tail != NIL {
            let b = self.s.tail;
            if self.state[b as usize] == LirsState::Lir {
                break;
            }
            self.s_links.remove(&mut self.s, b);
            self.in_s[b as usize] = false;
            if self.state[b as usize] == LirsState::HirGhost {
                self.state[b as usize] = LirsState::None;
            }
        }
    }

    /// Turns the bottom LIR page of S into a resident HIR page at the end of Q.
    fn demote_bottom(&mut self) {
        let b = self.s.tail;
        assert!(b != NIL && self.state[b as usize] == LirsState::Lir);
        self.s_links.remove(&mut self.s, b);
        self.in_s[b as usize] = false;
        self.state[b as usize] = LirsState::HirResident;
        self.q_links.push_head(&mut self.q, b);
        self.lir_len -= 1;
        self.prune();
    }
}

impl Policy for Lirs {
    fn name(&self) -> &'static str {
        "lirs"
    }
    fn contains(&self, page: u32) -> bool {
        matches!(
            self.state[page as usize],
            LirsState::Lir | LirsState::HirResident
        )
    }
    fn access(&mut self, x: u32, _pos: usize) -> bool {
        let xi = x as usize;
        match self.state[xi] {
            LirsState::Lir => {
                self.s_top(x);
                self.prune();
                false
            }
            LirsState::HirResident => {
                if self.in_s[xi] {
                    self.q_links.remove(&mut self.q, x);
                    self.state[xi] = LirsState::Lir;
                    self.lir_len += 1;
                    self.s_top(x);
                    self.demote_bottom();
                } else {
                    self.s_top(x);
                    self.q_links.remove(&mut self.q, x);
                    self.q_links.push_head(&mut self.q, x);
                }
                false
            }
            st => {
                if self.lir_len < self.lir_cap && self.q.len == 0 {
                    self.state[xi] = LirsState::Lir;
                    self.lir_len += 1;
                    self.s_top(x);
                    return true;
                }
                if self.q.len >= self.hir_cap {
                    let v = self.q_links.pop_tail(&mut self.q).expect("full queue");
                    self.state[v as usize] = if self.in_s[v as usize] {
                        LirsState::HirGhost
                    } else {
                        LirsState::None
                    };
                }
                if st == LirsState::HirGhost && self.in_s[xi] {
                    self.state[xi] = LirsState::Lir;
                    self.lir_len += 1;
                    self.s_top(x);
                    self.demote_bottom();
                } else {
                    self.state[xi] = LirsState::HirResident;
                    self.s_top(x);
                    self.q_links.push_head(&mut self.q, x);
                }
                true
            }
        }
    }
    fn resident_pages(&self) -> usize {
        self.lir_len + self.q.len
    }
}

/// S3-FIFO (Yang et al., SOSP'23), following libCacheSim's `S3FIFO.c`: 10% small FIFO, main FIFO
/// with a 2-bit clock, ghost FIFO of 90% of the tier's entries, move-to-main threshold 2, and
/// inserts go to main while the small FIFO is full before the first eviction.
pub struct S3Fifo {
    small_cap: usize,
    main_cap: usize,
    ghost_cap: usize,
    move_threshold: u8,
    has_evicted: bool,
    links: Links,
    small: List,
    main: List,
    ghost: List,
    at: Vec<u8>,
    freq: Vec<u8>,
}

const S3_NONE: u8 = 0;
const S3_SMALL: u8 = 1;
const S3_MAIN: u8 = 2;
const S3_GHOST: u8 = 3;

impl S3Fifo {
    pub fn new(n: usize, cap: usize) -> Self {
        Self::with_params(n, cap, 0.1, 0.9, 2)
    }

    pub fn with_params(n: usize, cap: usize, small_ratio: f64, ghost_ratio: f64, th: u8) -> Self {
        assert!(cap > 1, "S3-FIFO needs at least two pages");
        let small_cap = ((cap as f64 * small_ratio) as usize).max(1);
        S3Fifo {
            small_cap,
            main_cap: cap - small_cap,
            ghost_cap: (cap as f64 * ghost_ratio) as usize,
            move_threshold: th,
            has_evicted: false,
            links: Links::new(n),
            small: List::default(),
            main: List::default(),
            ghost: List::default(),
            at: vec![S3_NONE; n],
            freq: vec![0; n],
        }
    }

    fn ghost_insert(&mut self, x: u32) {
        if self.ghost_cap == 0 {
            self.at[x as usize] = S3_NONE;
            return;
        }
        if self.ghost.len >= self.ghost_cap {
            let v = self.links.pop_tail(&mut self.ghost).expect("full ghost");
            self.at[v as usize] = S3_NONE;
        }
        self.links.push_head(&mut self.ghost, x);
        self.at[x as usize] = S3_GHOST;
    }

    fn evict_small(&mut self) {
        while let Some(v) = self.links.pop_tail(&mut self.small) {
            if self.freq[v as usize] >= self.move_threshold {
                self.links.push_head(&mut self.main, v);
                self.at[v as usize] = S3_MAIN;
                self.freq[v as usize] = 0;
            } else {
                self.ghost_insert(v);
                return;
            }
        }
    }

    fn evict_main(&mut self) {
        while let Some(v) = self.links.pop_tail(&mut self.main) {
            let f = self.freq[v as usize];
            if f >= 1 {
                self.links.push_head(&mut self.main, v);
                self.freq[v as usize] = f.min(3) - 1;
            } else {
                self.at[v as usize] = S3_NONE;
                return;
            }
        }
    }

    fn evict(&mut self) {
        self.has_evicted = true;
        if self.main.len > self.main_cap || self.small.len == 0 {
            self.evict_main();
        } else {
            self.evict_small();
        }
    }

    /// Whether `x` is remembered in the ghost FIFO (recently evicted from the small FIFO).
    pub fn in_ghost(&self, x: u32) -> bool {
        self.at[x as usize] == S3_GHOST
    }

    /// Whether `x` is resident or in the ghost FIFO.
    pub fn tracked(&self, x: u32) -> bool {
        self.at[x as usize] != S3_NONE
    }

    /// Ghost FIFO capacity in pages.
    pub fn ghost_capacity(&self) -> usize {
        self.ghost_cap
    }

    /// Admits a page that is not resident.
    pub fn insert(&mut self, x: u32) {
        let xi = x as usize;
        debug_assert!(self.at[xi] == S3_NONE || self.at[xi] == S3_GHOST);
        while self.small.len + self.main.len >= self.small_cap + self.main_cap {
            self.evict();
        }
        if self.at[xi] == S3_GHOST {
            self.links.remove(&mut self.ghost, x);
            self.links.push_head(&mut self.main, x);
            self.at[xi] = S3_MAIN;
        } else if !self.has_evicted && self.small.len >= self.small_cap {
            // Before the first eviction a full small FIFO overflows into main (libCacheSim).
            self.links.push_head(&mut self.main, x);
            self.at[xi] = S3_MAIN;
        } else {
            self.links.push_head(&mut self.small, x);
            self.at[xi] = S3_SMALL;
        }
        self.freq[xi] = 0;
    }
}

impl Policy for S3Fifo {
    fn name(&self) -> &'static str {
        "s3fifo"
    }
    fn contains(&self, page: u32) -> bool {
        matches!(self.at[page as usize], S3_SMALL | S3_MAIN)
    }
    fn access(&mut self, x: u32, _pos: usize) -> bool {
        if self.contains(x) {
            let f = &mut self.freq[x as usize];
            *f = (*f + 1).min(3);
            false
        } else {
            self.insert(x);
            true
        }
    }
    fn resident_pages(&self) -> usize {
        self.small.len + self.main.len
    }
}

/// SIEVE (Zhang et al., NSDI'24).
pub struct Sieve {
    cap: usize,
    links: Links,
    list: List,
    hand: u32,
    resident: Vec<bool>,
    visited: Vec<bool>,
}

impl Sieve {
    pub fn new(n: usize, cap: usize) -> Self {
        assert!(cap > 0, "fast tier must hold at least one page");
        Sieve {
            cap,
            links: Links::new(n),
            list: List::default(),
            hand: NIL,
            resident: vec![false; n],
            visited: vec![false; n],
        }
    }
}

impl Policy for Sieve {
    fn name(&self) -> &'static str {
        "sieve"
    }
    fn contains(&self, page: u32) -> bool {
        self.resident[page as usize]
    }
    fn access(&mut self, x: u32, _pos: usize) -> bool {
        if self.resident[x as usize] {
            self.visited[x as usize] = true;
            return false;
        }
        if self.list.len >= self.cap {
            let mut o = if self.hand != NIL {
                self.hand
            } else {
                self.list.tail
            };
            while self.visited[o as usize] {
                self.visited[o as usize] = false;
                o = self.links.newer(o);
                if o == NIL {
                    o = self.list.tail;
                }
            }
            self.hand = self.links.newer(o);
            self.links.remove(&mut self.list, o);
            self.resident[o as usize] = false;
        }
        self.links.push_head(&mut self.list, x);
        self.resident[x as usize] = true;
        self.visited[x as usize] = false;
        true
    }
    fn resident_pages(&self) -> usize {
        self.list.len
    }
}

/// Position of the next reference of the same page for every position of the flat page stream
/// (`u64::MAX` when never referenced again).
pub fn next_use(trace: &Trace) -> Vec<u64> {
    let mut last = vec![u64::MAX; trace.unique_pages()];
    let mut out = vec![u64::MAX; trace.pages.len()];
    for (i, &p) in trace.pages.iter().enumerate().rev() {
        out[i] = last[p as usize];
        last[p as usize] = i as u64;
    }
    out
}

/// Belady's MIN (offline): evicts the page referenced farthest in the future; a missed page that
/// is referenced later than every resident page bypasses the tier.
pub struct Belady {
    cap: usize,
    next: Vec<u64>,
    cur: Vec<u64>,
    resident: Vec<bool>,
    len: usize,
    heap: BinaryHeap<(u64, u32)>,
    bypass: bool,
}

impl Belady {
    pub fn new(trace: &Trace, cap: usize, bypass: bool) -> Self {
        let n = trace.unique_pages();
        Belady {
            cap,
            next: next_use(trace),
            cur: vec![0; n],
            resident: vec![false; n],
            len: 0,
            heap: BinaryHeap::new(),
            bypass,
        }
    }

    fn top_valid(&mut self) -> (u64, u32) {
        loop {
            let &(nx, p) = self.heap.peek().expect("non-empty heap while full");
            if self.resident[p as usize] && self.cur[p as usize] == nx {
                return (nx, p);
            }
            self.heap.pop();
        }
    }
}

impl Policy for Belady {
    fn name(&self) -> &'static str {
        "belady"
    }
    fn contains(&self, page: u32) -> bool {
        self.resident[page as usize]
    }
    fn access(&mut self, x: u32, pos: usize) -> bool {
        let nx = self.next[pos];
        let xi = x as usize;
        if self.resident[xi] {
            self.cur[xi] = nx;
            self.heap.push((nx, x));
            return false;
        }
        if self.len >= self.cap {
            let (far, v) = self.top_valid();
            if self.bypass && nx >= far {
                return false;
            }
            self.heap.pop();
            self.resident[v as usize] = false;
            self.len -= 1;
        }
        self.resident[xi] = true;
        self.cur[xi] = nx;
        self.heap.push((nx, x));
        self.len += 1;
        if self.heap.len() > 8 * self.cap + 1024 {
            let (cur, res) = (&self.cur, &self.resident);
            self.heap
                .retain(|&(n, p)| res[p as usize] && cur[p as usize] == n);
        }
        true
    }
    fn resident_pages(&self) -> usize {
        self.len
    }
}
