//! What a commit writes to sled's index, and reads of the index that see such writes before
//! sled holds them.
//!
//! sled's own [`sled::Batch`] cannot be read or merged, and the writer needs both: it applies
//! the batches of several commits to sled as one (each sled batch costs a fixed ~0.25 ms
//! whatever it holds; see `writer/index.rs`), and until then every read it makes must see
//! them. [`Batch`] is that batch, and [`Read`] is a read of sled, or of sled under batches
//! still waiting, with the same answers either way.

use std::collections::{BTreeMap, btree_map};
use std::ops::{Bound, Range};

use sled::IVec;

/// An ordered set of writes to sled, applied atomically: a later write of a key replaces an
/// earlier one, as in [`sled::Batch`].
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// Each written key: its new value, or `None` where it is removed.
    writes: BTreeMap<IVec, Option<IVec>>,
}

impl Batch {
    /// Sets `key` to `value`.
    pub(crate) fn insert(&mut self, key: impl Into<IVec>, value: impl Into<IVec>) {
        self.writes.insert(key.into(), Some(value.into()));
    }

    /// Removes `key`.
    pub(crate) fn remove(&mut self, key: impl Into<IVec>) {
        self.writes.insert(key.into(), None);
    }

    /// Adds the writes of a batch made after this one: where both write a key, `later` wins.
    pub(crate) fn append(&mut self, later: Batch) {
        if self.writes.is_empty() {
            self.writes = later.writes;
        } else {
            self.writes.extend(later.writes);
        }
    }

    /// Whether it writes nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// The same writes as a batch sled applies.
    pub(crate) fn into_sled(self) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (key, value) in self.writes {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        batch
    }

    /// What it writes in `range`, in key order.
    fn range(&self, range: Range<&[u8]>) -> btree_map::Range<'_, IVec, Option<IVec>> {
        let bounds = (Bound::Included(range.start), Bound::Excluded(range.end));
        self.writes.range::<[u8], _>(bounds)
    }

    /// What it writes under keys starting with `prefix`, in key order.
    fn prefixed<'a>(
        &'a self,
        prefix: &[u8],
    ) -> impl Iterator<Item = (&'a IVec, &'a Option<IVec>)> + use<'a> {
        let bounds = (Bound::Included(prefix), Bound::Unbounded);
        let prefix = IVec::from(prefix);
        self.writes
            .range::<[u8], _>(bounds)
            .take_while(move |(key, _)| key.starts_with(&prefix))
    }
}

/// One entry of a range read.
pub(crate) type Entry = sled::Result<(IVec, IVec)>;
/// The entries of a range read, in key order.
pub(crate) type Entries<'a> = Box<dyn Iterator<Item = Entry> + 'a>;

/// Reads of the index, as sled's own reads of the same names.
pub(crate) trait Read {
    /// The value of `key`.
    fn get(&self, key: &[u8]) -> sled::Result<Option<IVec>>;
    /// The entries with keys from `from` up to (not including) `to`.
    fn range(&self, from: &[u8], to: &[u8]) -> Entries<'_>;
    /// The last entry with a key from `from` up to (not including) `to`.
    fn last_below(&self, from: &[u8], to: &[u8]) -> sled::Result<Option<(IVec, IVec)>>;
    /// The entries with keys starting with `prefix`.
    fn scan_prefix(&self, prefix: &[u8]) -> Entries<'_>;
}

impl Read for sled::Tree {
    fn get(&self, key: &[u8]) -> sled::Result<Option<IVec>> {
        sled::Tree::get(self, key)
    }

    fn range(&self, from: &[u8], to: &[u8]) -> Entries<'_> {
        Box::new(sled::Tree::range(self, from..to))
    }

    fn last_below(&self, from: &[u8], to: &[u8]) -> sled::Result<Option<(IVec, IVec)>> {
        sled::Tree::range(self, from..to).next_back().transpose()
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Entries<'_> {
        Box::new(sled::Tree::scan_prefix(self, prefix))
    }
}

/// sled as it will be once `waiting` is applied to it.
#[derive(Clone, Copy)]
pub(crate) struct Overlay<'a> {
    /// What sled holds.
    pub(crate) db: &'a sled::Db,
    /// Writes not applied to it yet, which win over it.
    pub(crate) waiting: &'a Batch,
}

impl<'a> Overlay<'a> {
    /// [`Read::get`].
    pub(crate) fn get(self, key: &[u8]) -> sled::Result<Option<IVec>> {
        match self.waiting.writes.get(key) {
            Some(written) => Ok(written.clone()),
            None => sled::Tree::get(self.db, key),
        }
    }

    /// [`Read::range`], for as long as the overlay's parts live.
    pub(crate) fn range(self, from: &[u8], to: &[u8]) -> Entries<'a> {
        let writes = self.waiting.range(from..to);
        let under = sled::Tree::range(self.db, from..to);
        Box::new(merged(under, writes))
    }

    /// [`Read::last_below`].
    pub(crate) fn last_below(self, from: &[u8], to: &[u8]) -> sled::Result<Option<(IVec, IVec)>> {
        let written = (self.waiting.range(from..to).rev())
            .find_map(|(key, value)| Some((key, value.as_ref()?)));
        let mut held = None;
        for entry in sled::Tree::range(self.db, from..to).rev() {
            let (key, value) = entry?;
            // A key the batch writes is as the batch says, which `written` covers.
            if !self.waiting.writes.contains_key(&key) {
                held = Some((key, value));
                break;
            }
        }
        Ok(match (written, held) {
            (Some((key, _)), Some(held)) if *key < held.0 => Some(held),
            (Some((key, value)), _) => Some((key.clone(), value.clone())),
            (None, held) => held,
        })
    }

    /// [`Read::scan_prefix`], for as long as the overlay's parts live.
    pub(crate) fn scan_prefix(self, prefix: &[u8]) -> Entries<'a> {
        let writes = self.waiting.prefixed(prefix);
        let under = sled::Tree::scan_prefix(self.db, prefix);
        Box::new(merged(under, writes))
    }
}

impl Read for Overlay<'_> {
    fn get(&self, key: &[u8]) -> sled::Result<Option<IVec>> {
        Overlay::get(*self, key)
    }

    fn range(&self, from: &[u8], to: &[u8]) -> Entries<'_> {
        Overlay::range(*self, from, to)
    }

    fn last_below(&self, from: &[u8], to: &[u8]) -> sled::Result<Option<(IVec, IVec)>> {
        Overlay::last_below(*self, from, to)
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Entries<'_> {
        Overlay::scan_prefix(*self, prefix)
    }
}

/// The entries of `under` with `writes` (same range, key order) applied over them.
fn merged<'a>(
    under: impl Iterator<Item = Entry>,
    writes: impl Iterator<Item = (&'a IVec, &'a Option<IVec>)>,
) -> impl Iterator<Item = Entry> {
    let mut under = under.peekable();
    let mut writes = writes.peekable();
    std::iter::from_fn(move || {
        loop {
            let write_first = match (under.peek(), writes.peek()) {
                (_, None) => return under.next(),
                (None, Some(_)) => true,
                (Some(Err(_)), _) => return under.next(),
                (Some(Ok((key, _))), Some((written, _))) => *written <= key,
            };
            if !write_first {
                return under.next();
            }
            let (key, value) = writes.next().expect("peeked");
            // The write replaces what sled holds under the same key.
            if matches!(under.peek(), Some(Ok((held, _))) if held == key) {
                under.next();
            }
            if let Some(value) = value {
                return Some(Ok((key.clone(), value.clone())));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(entries: Entries<'_>) -> Vec<(Vec<u8>, Vec<u8>)> {
        entries
            .map(|e| {
                let (k, v) = e.unwrap();
                (k.to_vec(), v.to_vec())
            })
            .collect()
    }

    #[test]
    fn an_overlay_reads_as_sled_does_once_the_batch_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        for key in [b"a1", b"a3", b"a5", b"b1", b"b2"] {
            db.insert(key, key.as_slice()).unwrap();
        }
        let mut waiting = Batch::default();
        waiting.insert(b"a0".as_slice(), b"new".as_slice());
        waiting.remove(b"a3".as_slice());
        waiting.insert(b"a5".as_slice(), b"replaced".as_slice());
        waiting.insert(b"a6".as_slice(), b"new".as_slice());
        waiting.remove(b"a9".as_slice());
        let mut later = Batch::default();
        later.insert(b"a3".as_slice(), b"back".as_slice());
        later.remove(b"b1".as_slice());
        waiting.append(later);

        let reads = |index: &dyn Read| {
            (
                keys(index.range(b"a", b"b")),
                keys(index.range(b"a2", b"a6")),
                keys(index.scan_prefix(b"b")),
                index.last_below(b"a", b"a5").unwrap(),
                index.last_below(b"a", b"a9").unwrap(),
                index.last_below(b"b", b"b2").unwrap(),
                index.get(b"a3").unwrap().map(|v| v.to_vec()),
                index.get(b"b1").unwrap(),
                index.get(b"b2").unwrap().map(|v| v.to_vec()),
            )
        };
        let before = reads(&Overlay {
            db: &db,
            waiting: &waiting,
        });
        db.apply_batch(waiting.into_sled()).unwrap();
        let after = reads(&*db);
        assert_eq!(before, after);
        let pairs = |list: &[(&str, &str)]| -> Vec<(Vec<u8>, Vec<u8>)> {
            list.iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect()
        };
        assert_eq!(
            after.0,
            pairs(&[
                ("a0", "new"),
                ("a1", "a1"),
                ("a3", "back"),
                ("a5", "replaced"),
                ("a6", "new")
            ])
        );
        assert_eq!(after.1, pairs(&[("a3", "back"), ("a5", "replaced")]));
        assert_eq!(after.2, pairs(&[("b2", "b2")]));
        let last = |entry: Option<(IVec, IVec)>| entry.map(|(k, v)| (k.to_vec(), v.to_vec()));
        assert_eq!(last(after.3), Some(pairs(&[("a3", "back")])[0].clone()));
        assert_eq!(last(after.4), Some(pairs(&[("a6", "new")])[0].clone()));
        assert_eq!(after.5, None);
    }
}
