//! Actors, dots and causal contexts: the vocabulary of causality.
//!
//! A [`CausalContext`] is a set of [`Dot`]s stored compactly as a version vector (every dot
//! `(actor, 1..=n)`) plus a "dot cloud" of the dots that are not contiguous with it. The form is
//! kept normalised at all times, so two contexts holding the same set of dots are equal field by
//! field and serialise to the same bytes.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A node incarnation: the identity that issues dots.
///
/// An actor is not a node. A node takes a fresh, random actor whenever it may have forgotten a
/// dot its actor issued (an unclean start, a wiped data directory, or deleting keys' local
/// state); see [`on_start`](super::on_start) and
/// [`on_local_deletion`](super::on_local_deletion).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Actor(pub u64);

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Actor({self})")
    }
}

/// One event: the `counter`-th write `actor` coordinated for one key (counters are per key).
/// Every write creates exactly one dot, and no actor ever issues the same dot twice for a key
/// (counters start at 1; counter 0 names no event).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    /// The incarnation that coordinated the write.
    pub actor: Actor,
    /// Its position in that incarnation's sequence of dots for the key, from 1.
    pub counter: u64,
}

impl Dot {
    /// The dot `(actor, counter)`.
    pub fn new(actor: Actor, counter: u64) -> Dot {
        Dot { actor, counter }
    }
}

impl fmt::Display for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}, {})", self.actor, self.counter)
    }
}

impl fmt::Debug for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dot{self}")
    }
}

/// A set of dots: everything some replica or some client has seen of one key.
///
/// It holds every dot `(a, 1..=version_vector[a])` and, in addition, the exact dots in the cloud.
/// It is always normalised: no cloud dot is already covered by the version vector, no cloud dot
/// is the next one of its actor's version-vector entry (it would have been folded in), and no
/// version-vector entry is zero. A dot with counter 0 counts as contained in every context, which
/// is what makes "`(a, 0)` names no event" consistent.
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "ContextRepr")]
pub struct CausalContext {
    vv: BTreeMap<Actor, u64>,
    cloud: BTreeSet<Dot>,
}

/// The unchecked wire form of a context; `TryFrom` below rejects it unless it is normalised.
#[derive(Deserialize)]
struct ContextRepr {
    vv: BTreeMap<Actor, u64>,
    cloud: BTreeSet<Dot>,
}

impl TryFrom<ContextRepr> for CausalContext {
    type Error = String;

    fn try_from(repr: ContextRepr) -> Result<CausalContext, String> {
        for (actor, counter) in &repr.vv {
            if *counter == 0 {
                return Err(format!("version vector entry of {actor} is zero"));
            }
        }
        for dot in &repr.cloud {
            let base = repr.vv.get(&dot.actor).copied().unwrap_or(0);
            if dot.counter <= base {
                return Err(format!("cloud dot {dot} is already covered"));
            }
            if dot.counter == base + 1 {
                return Err(format!("cloud dot {dot} should be folded into the vector"));
            }
        }
        Ok(CausalContext {
            vv: repr.vv,
            cloud: repr.cloud,
        })
    }
}

impl CausalContext {
    /// The empty context: has seen nothing.
    pub fn new() -> CausalContext {
        CausalContext::default()
    }

    /// The context holding exactly `dots`.
    pub fn from_dots(dots: impl IntoIterator<Item = Dot>) -> CausalContext {
        let mut context = CausalContext::new();
        for dot in dots {
            context.insert(dot);
        }
        context
    }

    /// The contiguous part: `actor -> n` means the dots `(actor, 1..=n)`.
    pub fn version_vector(&self) -> &BTreeMap<Actor, u64> {
        &self.vv
    }

    /// The dots held beyond the version vector (learned out of order).
    pub fn cloud(&self) -> &BTreeSet<Dot> {
        &self.cloud
    }

    /// Whether the context has seen `dot`.
    pub fn contains(&self, dot: &Dot) -> bool {
        dot.counter <= self.base(dot.actor) || self.cloud.contains(dot)
    }

    /// Whether every dot of `other` is in `self`.
    pub fn covers(&self, other: &CausalContext) -> bool {
        other
            .vv
            .iter()
            .all(|(actor, n)| self.covers_prefix(*actor, *n))
            && other.cloud.iter().all(|dot| self.contains(dot))
    }

    /// The highest counter of `actor` this context holds (0 if none).
    pub fn max_counter(&self, actor: Actor) -> u64 {
        let last_cloud = self
            .cloud
            .range(Dot::new(actor, 0)..=Dot::new(actor, u64::MAX))
            .next_back()
            .map_or(0, |dot| dot.counter);
        self.base(actor).max(last_cloud)
    }

    /// Adds one dot.
    pub fn insert(&mut self, dot: Dot) {
        if self.contains(&dot) {
            return;
        }
        if dot.counter == self.base(dot.actor) + 1 {
            self.vv.insert(dot.actor, dot.counter);
            self.fold(dot.actor);
        } else {
            self.cloud.insert(dot);
        }
    }

    /// Adds every dot of `other` (set union).
    pub fn join(&mut self, other: &CausalContext) {
        for (actor, n) in &other.vv {
            let entry = self.vv.entry(*actor).or_insert(0);
            *entry = (*entry).max(*n);
        }
        self.cloud.extend(other.cloud.iter().copied());
        self.normalise();
    }

    /// The union of two contexts.
    pub fn joined(&self, other: &CausalContext) -> CausalContext {
        let mut out = self.clone();
        out.join(other);
        out
    }

    /// Number of entries (version-vector entries plus cloud dots): what its size is measured in.
    pub fn len(&self) -> usize {
        self.vv.len() + self.cloud.len()
    }

    /// Whether the context has seen nothing.
    pub fn is_empty(&self) -> bool {
        self.vv.is_empty() && self.cloud.is_empty()
    }

    fn base(&self, actor: Actor) -> u64 {
        self.vv.get(&actor).copied().unwrap_or(0)
    }

    fn covers_prefix(&self, actor: Actor, n: u64) -> bool {
        let base = self.base(actor);
        // The cloud never holds `base + 1`, so anything beyond the vector breaks the prefix.
        n <= base
    }

    /// Moves the cloud dots of `actor` that have become contiguous into the version vector, and
    /// drops the ones the vector now covers.
    fn fold(&mut self, actor: Actor) {
        let mut base = self.base(actor);
        let dots: Vec<Dot> = self
            .cloud
            .range(Dot::new(actor, 0)..=Dot::new(actor, u64::MAX))
            .copied()
            .collect();
        for dot in dots {
            if dot.counter <= base {
                self.cloud.remove(&dot);
            } else if dot.counter == base + 1 {
                base = dot.counter;
                self.cloud.remove(&dot);
            } else {
                // Sorted by counter: nothing later can be contiguous either.
                break;
            }
        }
        if base > 0 {
            self.vv.insert(actor, base);
        }
    }

    fn normalise(&mut self) {
        self.vv.retain(|_, n| *n > 0);
        let actors: BTreeSet<Actor> = self.cloud.iter().map(|dot| dot.actor).collect();
        for actor in actors {
            self.fold(actor);
        }
    }
}

impl fmt::Debug for CausalContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        let mut first = true;
        for (actor, n) in &self.vv {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            write!(f, "{actor}:1..={n}")?;
        }
        for dot in &self.cloud {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            write!(f, "{}:{}", dot.actor, dot.counter)?;
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dot(actor: u64, counter: u64) -> Dot {
        Dot::new(Actor(actor), counter)
    }

    #[test]
    fn out_of_order_dots_fold_into_the_vector_once_contiguous() {
        let mut context = CausalContext::new();
        context.insert(dot(1, 3));
        context.insert(dot(1, 2));
        assert_eq!(context.len(), 2, "{context:?}");
        assert!(!context.contains(&dot(1, 1)));
        context.insert(dot(1, 1));
        assert_eq!(context.version_vector().get(&Actor(1)), Some(&3));
        assert!(context.cloud().is_empty());
        assert_eq!(context.max_counter(Actor(1)), 3);
        assert_eq!(context.max_counter(Actor(2)), 0);
    }

    #[test]
    fn display_is_sixteen_hex_digits() {
        assert_eq!(Actor(0xab).to_string(), "00000000000000ab");
        assert_eq!(dot(1, 7).to_string(), "(0000000000000001, 7)");
    }

    #[test]
    fn non_normalised_wire_forms_are_rejected() {
        let covered = (
            BTreeMap::from([(Actor(1), 2u64)]),
            BTreeSet::from([dot(1, 2)]),
        );
        let foldable = (
            BTreeMap::from([(Actor(1), 2u64)]),
            BTreeSet::from([dot(1, 3)]),
        );
        let zero = (BTreeMap::from([(Actor(1), 0u64)]), BTreeSet::new());
        for (vv, cloud) in [covered, foldable, zero] {
            let bytes = rmp_serde::to_vec(&(vv, cloud)).unwrap();
            assert!(rmp_serde::from_slice::<CausalContext>(&bytes).is_err());
        }
    }

    fn dots() -> impl Strategy<Value = Vec<Dot>> {
        proptest::collection::vec((0u64..3, 1u64..12), 0..20)
            .prop_map(|v| v.into_iter().map(|(a, c)| dot(a, c)).collect())
    }

    proptest! {
        /// The compact form holds exactly the inserted set, whatever the insertion order.
        #[test]
        fn context_is_the_set_of_its_dots(a in dots(), b in dots()) {
            let set: BTreeSet<Dot> = a.iter().chain(b.iter()).copied().collect();
            let mut joined = CausalContext::from_dots(a.iter().copied());
            joined.join(&CausalContext::from_dots(b.iter().copied()));
            let rev = CausalContext::from_dots(set.iter().rev().copied());
            prop_assert_eq!(&joined, &rev);
            for actor in 0..3 {
                for counter in 1..14 {
                    let d = dot(actor, counter);
                    prop_assert_eq!(joined.contains(&d), set.contains(&d));
                }
            }
            let bytes = rmp_serde::to_vec(&joined).unwrap();
            let decoded: CausalContext = rmp_serde::from_slice(&bytes).unwrap();
            prop_assert_eq!(&decoded, &joined);
            prop_assert!(joined.covers(&CausalContext::from_dots(a.iter().copied())));
        }
    }
}
