//! Page bookkeeping of `PagedKVCache`: a pool of fixed-size pages, per-sequence page lists (the
//! block table rows) and lengths, reference counts so forks share a prefix copy-on-write, and a
//! free list. It owns no tensor memory: the Python side keeps the page tensors (allocated by
//! torch) and performs the page copies this module asks for.

use crate::error::{Error, Result};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default)]
struct Seq {
    pages: Vec<u32>,
    len: usize,
}

#[derive(Debug)]
pub struct PagePool {
    page_size: usize,
    refs: Vec<u32>,
    /// Free pages, popped from the end (lowest page ids first).
    free: Vec<u32>,
    seqs: BTreeMap<u64, Seq>,
    next_id: u64,
}

/// A page copy the caller must perform before writing: copy-on-write of a shared last page.
pub type PageCopy = (u32, u32);

impl PagePool {
    pub fn new(num_pages: usize, page_size: usize) -> Result<PagePool> {
        if page_size == 0 || !page_size.is_power_of_two() || page_size > crate::ops::decode::MAX_PAGE_SIZE {
            return Err(Error::Value(format!("page_size must be a power of two from 1 to 256, got {page_size}")));
        }
        if num_pages == 0 || num_pages > i32::MAX as usize {
            return Err(Error::Value(format!("num_pages must be in [1, 2^31), got {num_pages}")));
        }
        Ok(PagePool {
            page_size,
            refs: vec![0; num_pages],
            free: (0..num_pages as u32).rev().collect(),
            seqs: BTreeMap::new(),
            next_id: 0,
        })
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn num_pages(&self) -> usize {
        self.refs.len()
    }

    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// A new empty sequence; returns its id.
    pub fn allocate(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(id, Seq::default());
        id
    }

    fn seq(&self, id: u64) -> Result<&Seq> {
        self.seqs.get(&id).ok_or_else(|| Error::Value(format!("sequence {id} is not allocated in this cache")))
    }

    pub fn len(&self, id: u64) -> Result<usize> {
        Ok(self.seq(id)?.len)
    }

    pub fn pages(&self, id: u64) -> Result<&[u32]> {
        Ok(&self.seq(id)?.pages)
    }

    /// Room for `n` more tokens in each of `ids` (lengths advance by `n`): new pages from the
    /// free list, and a private copy of a shared last page that the new tokens would write
    /// into. All or nothing: on a full pool nothing changes. Returns the page copies
    /// (src, dst) to perform before the tokens are written.
    pub fn extend(&mut self, ids: &[u64], n: &[usize]) -> Result<Vec<PageCopy>> {
        if ids.len() != n.len() {
            return Err(Error::Value(format!("{} sequence ids but {} token counts", ids.len(), n.len())));
        }
        let mut need = 0;
        for (i, (&id, &k)) in ids.iter().zip(n).enumerate() {
            if ids[..i].contains(&id) {
                return Err(Error::Value(format!("sequence {id} appears twice in one extend")));
            }
            let s = self.seq(id)?;
            need += (s.len + k).div_ceil(self.page_size) - s.pages.len();
            if k > 0 && !s.len.is_multiple_of(self.page_size) && self.refs[*s.pages.last().unwrap() as usize] > 1 {
                need += 1;
            }
        }
        if need > self.free.len() {
            return Err(Error::Value(format!(
                "the KV cache is out of pages: {need} needed, {} free of {} (page size {})",
                self.free.len(),
                self.refs.len(),
                self.page_size
            )));
        }
        let mut copies = Vec::new();
        for (&id, &k) in ids.iter().zip(n) {
            if k == 0 {
                continue;
            }
            let ps = self.page_size;
            let mut s = self.seqs.remove(&id).unwrap();
            if !s.len.is_multiple_of(ps) {
                let last = *s.pages.last().unwrap();
                if self.refs[last as usize] > 1 {
                    let fresh = self.take();
                    self.refs[last as usize] -= 1;
                    *s.pages.last_mut().unwrap() = fresh;
                    copies.push((last, fresh));
                }
            }
            while s.pages.len() < (s.len + k).div_ceil(ps) {
                let p = self.take();
                s.pages.push(p);
            }
            s.len += k;
            self.seqs.insert(id, s);
        }
        Ok(copies)
    }

    fn take(&mut self) -> u32 {
        let p = self.free.pop().expect("pages were counted before taking");
        self.refs[p as usize] = 1;
        p
    }

    /// A new sequence sharing all of `id`'s pages (copy-on-write when either extends into a
    /// shared partial page).
    pub fn fork(&mut self, id: u64) -> Result<u64> {
        let s = self.seq(id)?.clone();
        for &p in &s.pages {
            self.refs[p as usize] += 1;
        }
        let new = self.next_id;
        self.next_id += 1;
        self.seqs.insert(new, s);
        Ok(new)
    }

    /// Drops `id`; pages no other sequence holds return to the free list.
    pub fn free(&mut self, id: u64) -> Result<()> {
        let s = self.seqs.remove(&id).ok_or_else(|| Error::Value(format!("sequence {id} is not allocated in this cache")))?;
        for p in s.pages {
            self.refs[p as usize] -= 1;
            if self.refs[p as usize] == 0 {
                self.free.push(p);
            }
        }
        Ok(())
    }

    /// Block-table rows of `ids`, `width` pages each (at least the longest), -1 past each
    /// sequence's pages.
    pub fn block_table(&self, ids: &[u64], width: usize) -> Result<(Vec<i32>, usize)> {
        let mut w = width;
        for &id in ids {
            w = w.max(self.seq(id)?.pages.len());
        }
        let mut table = vec![-1i32; ids.len() * w];
        for (row, &id) in ids.iter().enumerate() {
            for (j, &p) in self.seq(id)?.pages.iter().enumerate() {
                table[row * w + j] = p as i32;
            }
        }
        Ok((table, w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extend_fork_copy_on_write_and_free() {
        let mut pool = PagePool::new(8, 4).unwrap();
        let a = pool.allocate();
        assert!(pool.extend(&[a], &[6]).unwrap().is_empty());
        assert_eq!((pool.len(a).unwrap(), pool.pages(a).unwrap()), (6, &[0u32, 1][..]));
        let b = pool.fork(a).unwrap();
        // b writes into the shared half-full page 1: it gets a private copy first.
        assert_eq!(pool.extend(&[b], &[1]).unwrap(), vec![(1, 2)]);
        assert_eq!(pool.pages(b).unwrap(), &[0, 2]);
        // a still owns page 1 alone now: no copy.
        assert!(pool.extend(&[a], &[3]).unwrap().is_empty());
        assert_eq!(pool.pages(a).unwrap(), &[0, 1, 3]);
        assert_eq!(pool.free_pages(), 4);
        pool.free(a).unwrap();
        assert_eq!(pool.free_pages(), 6); // page 0 is still b's
        let (t, w) = pool.block_table(&[b], 3).unwrap();
        assert_eq!((t, w), (vec![0, 2, -1], 3));
        pool.free(b).unwrap();
        assert_eq!(pool.free_pages(), 8);
    }

    #[test]
    fn out_of_pages_changes_nothing() {
        let mut pool = PagePool::new(2, 16).unwrap();
        let (a, b) = (pool.allocate(), pool.allocate());
        pool.extend(&[a], &[16]).unwrap();
        let err = pool.extend(&[a, b], &[1, 16]).unwrap_err();
        assert!(err.to_string().contains("out of pages: 2 needed, 1 free"), "{err}");
        assert_eq!((pool.len(a).unwrap(), pool.len(b).unwrap(), pool.free_pages()), (16, 0, 1));
        assert!(pool.extend(&[a, a], &[1, 1]).is_err());
        assert!(pool.free(99).is_err());
    }
}
