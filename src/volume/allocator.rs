//! Per-tier space allocator: free runs of granules in a BTreeMap.
//!
//! Only the metadata service uses it (never the I/O path). At start it is
//! rebuilt from the recovered extent maps: everything not mapped is free.

use std::collections::BTreeMap;

pub struct TierAllocator {
    /// start granule -> length in granules.
    free: BTreeMap<u64, u64>,
    pub total_granules: u64,
    free_granules: u64,
    /// One past the last granule it may hand out.
    end_granule: u64,
}

impl TierAllocator {
    /// A tier whose usable granules are `[first, first + count)`.
    pub fn new(first: u64, count: u64) -> TierAllocator {
        let mut free = BTreeMap::new();
        if count > 0 {
            free.insert(first, count);
        }
        TierAllocator {
            free,
            total_granules: count,
            free_granules: count,
            end_granule: first + count,
        }
    }

    /// One past the last granule of the tier's address space (recovery checks runs against it).
    pub fn end_granule(&self) -> u64 {
        self.end_granule
    }

    pub fn free_granules(&self) -> u64 {
        self.free_granules
    }

    pub fn used_granules(&self) -> u64 {
        self.total_granules - self.free_granules
    }

    /// The free runs `(start, count)` in order (trimming a released tier).
    pub fn free_ranges(&self) -> Vec<(u64, u64)> {
        self.free.iter().map(|(&s, &l)| (s, l)).collect()
    }

    /// Allocates `count` contiguous granules aligned to `align` (first fit).
    pub fn alloc(&mut self, count: u64, align: u64) -> Option<u64> {
        let (start, len, at) = self.free.iter().find_map(|(&s, &l)| {
            let at = s.next_multiple_of(align);
            (at + count <= s + l).then_some((s, l, at))
        })?;
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - start);
        }
        if at + count < start + len {
            self.free.insert(at + count, start + len - at - count);
        }
        self.free_granules -= count;
        Some(at)
    }

    /// Marks `[start, start+count)` used (recovery). Fails if it is not free: two map
    /// entries claiming the same space, or a claim past the tier, is corrupt metadata.
    pub fn reserve(&mut self, start: u64, count: u64) -> Result<(), String> {
        let not_free =
            || format!("recovered map claims granules {start}+{count} that are not free");
        let end = start.checked_add(count).ok_or_else(not_free)?;
        let (&s, &l) = self.free.range(..=start).next_back().ok_or_else(not_free)?;
        if end > s + l {
            return Err(not_free());
        }
        self.free.remove(&s);
        if start > s {
            self.free.insert(s, start - s);
        }
        if end < s + l {
            self.free.insert(end, s + l - end);
        }
        self.free_granules -= count;
        Ok(())
    }

    /// Whether every granule of `[start, start+count)` is free.
    pub fn is_free(&self, start: u64, count: u64) -> bool {
        self.free
            .range(..=start)
            .next_back()
            .is_some_and(|(&s, &l)| start + count <= s + l)
    }

    /// Returns `[start, start+count)` to the free set, merging neighbours.
    pub fn free(&mut self, start: u64, count: u64) {
        let mut s = start;
        let mut l = count;
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            assert!(ps + pl <= start, "double free of granules {start}+{count}");
            if ps + pl == start {
                self.free.remove(&ps);
                s = ps;
                l += pl;
            }
        }
        if let Some((&ns, &nl)) = self.free.range(start..).next() {
            assert!(
                start + count <= ns,
                "double free of granules {start}+{count}"
            );
            if start + count == ns {
                self.free.remove(&ns);
                l += nl;
            }
        }
        self.free.insert(s, l);
        self.free_granules += count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_reserve() {
        let mut a = TierAllocator::new(16, 64);
        let x = a.alloc(16, 16).unwrap();
        assert_eq!(x, 16);
        let y = a.alloc(16, 16).unwrap();
        assert_eq!(y, 32);
        assert_eq!(a.used_granules(), 32);
        a.free(x, 16);
        assert_eq!(a.alloc(16, 16), Some(16));
        a.reserve(64, 16).unwrap();
        assert!(a.reserve(70, 1).is_err(), "reserved twice");
        assert!(a.reserve(u64::MAX, 2).is_err(), "past the end");
        assert_eq!(a.alloc(16, 16), Some(48));
        assert_eq!(a.alloc(16, 16), None, "tier full is a normal answer");
        a.free(48, 16);
        a.free(16, 16);
        a.free(32, 16);
        a.free(64, 16);
        assert_eq!(a.free_granules(), 64);
        assert_eq!(a.alloc(64, 16), Some(16), "neighbours merged");
    }
}
