//! Packed prefix trees of token sequences: how scoring lays out a batch.
//!
//! A [`PrefixTree`] is a trie over token ids: each node is one token at one position
//! (its depth), each inserted sequence a path from a root. Sequences that share a prefix
//! share its nodes, so a batch of items computes every distinct prefix once: an item's
//! prompt once for all its choices, and a beginning that several prompts share once for
//! all of them. A node attends to its ancestors and to itself ([`PrefixTree::ancestry`]),
//! which is exactly what it would see in an unpadded forward over its own path, so its
//! hidden states are those of that forward (up to f32 rounding).
//!
//! There is no padding: the batch is the nodes, packed. Attention over ancestor chains
//! costs O(nodes × depth) on the CPU (a kernel of `ops.rs`); other devices
//! use a dense `[queries, nodes]` mask ([`Ancestry::mask`]).

use std::collections::HashMap;

/// Token sequences packed into one trie (see the module docs). Nodes are numbered in
/// insertion order, so a node's parent always has a smaller number.
#[derive(Debug, Clone, Default)]
pub struct PrefixTree {
    ids: Vec<u32>,
    depth: Vec<usize>,
    parent: Vec<Option<usize>>,
    /// `(parent + 1 or 0 for a root, token) -> node`.
    children: HashMap<(usize, u32), usize>,
}

impl PrefixTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Nodes (distinct token positions).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no sequence was inserted.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The token of each node.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The position (depth from the root, 0 for a root) of each node.
    pub fn positions(&self) -> &[usize] {
        &self.depth
    }

    /// Extends the path that ends at node `from` (`None`: a new sequence from position 0)
    /// with `tokens`, reusing the nodes that already exist, and returns the node of each
    /// token. A `from` that is not a node of this tree adds nothing and returns no nodes.
    pub fn extend(&mut self, from: Option<usize>, tokens: &[u32]) -> Vec<usize> {
        if from.is_some_and(|n| n >= self.len()) {
            return Vec::new();
        }
        let mut at = from;
        let mut nodes = Vec::with_capacity(tokens.len());
        for &t in tokens {
            let key = (at.map_or(0, |n| n + 1), t);
            let node = match self.children.get(&key) {
                Some(&n) => n,
                None => {
                    let n = self.ids.len();
                    self.ids.push(t);
                    self.depth.push(at.map_or(0, |p| self.depth[p] + 1));
                    self.parent.push(at);
                    self.children.insert(key, n);
                    n
                }
            };
            nodes.push(node);
            at = Some(node);
        }
        nodes
    }

    /// The ancestor chains of `queries` (nodes of this tree): what each attends to. A query
    /// that is not a node of this tree gets an empty chain.
    pub fn ancestry(&self, queries: &[usize]) -> Ancestry {
        let mut chain = Vec::new();
        let mut offsets = Vec::with_capacity(queries.len() + 1);
        offsets.push(0);
        for &q in queries {
            let start = chain.len();
            let mut at = (q < self.len()).then_some(q);
            while let Some(n) = at {
                chain.push(n);
                at = self.parent.get(n).copied().flatten();
            }
            chain[start..].reverse();
            offsets.push(chain.len());
        }
        Ancestry {
            nodes: self.len(),
            chain,
            offsets,
        }
    }
}

/// For each query node, its ancestors and itself, root first: query `i` attends to the
/// nodes `chain[offsets[i]..offsets[i + 1]]`.
#[derive(Debug, Clone)]
pub struct Ancestry {
    nodes: usize,
    chain: Vec<usize>,
    offsets: Vec<usize>,
}

impl Ancestry {
    /// Query nodes.
    pub fn queries(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Nodes of the tree (the keys).
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// The query nodes (the last node of each chain).
    pub fn query_nodes(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.queries()).filter_map(|i| self.of(i).last().copied())
    }

    /// The nodes query `i` attends to, root first (empty past the last query).
    pub fn of(&self, i: usize) -> &[usize] {
        match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(&a), Some(&b)) => &self.chain[a..b],
            _ => &[],
        }
    }

    /// The additive attention mask `[queries, nodes]`: 0 where a query sees a key,
    /// `-inf` elsewhere (every query sees itself, so no row is all `-inf`).
    pub fn mask(&self) -> Vec<f32> {
        let mut m = vec![f32::NEG_INFINITY; self.queries() * self.nodes];
        for i in 0..self.queries() {
            for &k in self.of(i) {
                m[i * self.nodes + k] = 0.0;
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefixes_are_stored_once() {
        let mut t = PrefixTree::new();
        let a = t.extend(None, &[5, 6, 7]);
        let b = t.extend(None, &[5, 6, 8]);
        assert_eq!(a, vec![0, 1, 2]);
        assert_eq!(b, vec![0, 1, 3]);
        let c = t.extend(Some(a[2]), &[9]);
        let d = t.extend(Some(b[2]), &[9]);
        assert_ne!(
            c, d,
            "equal tokens after different prefixes are different nodes"
        );
        assert_eq!(t.extend(None, &[5, 6, 7, 9]), vec![0, 1, 2, 4]);
        assert_eq!(t.len(), 6);
        assert_eq!(t.ids(), &[5, 6, 7, 8, 9, 9]);
        assert_eq!(t.positions(), &[0, 1, 2, 2, 3, 3]);
        let anc = t.ancestry(&[5, 0, 2]);
        assert_eq!((anc.queries(), anc.nodes()), (3, 6));
        assert_eq!(anc.of(0), &[0, 1, 3, 5]);
        assert_eq!(anc.of(1), &[0]);
        assert_eq!(anc.of(2), &[0, 1, 2]);
        assert!(anc.of(3).is_empty());
        let m = anc.mask();
        let seen: Vec<usize> = (0..6).filter(|&k| m[6 + k] == 0.0).collect();
        assert_eq!(seen, vec![0]);
        assert_eq!(m.iter().filter(|v| **v == 0.0).count(), 4 + 1 + 3);
    }

    #[test]
    fn a_new_root_token_starts_a_new_tree() {
        let mut t = PrefixTree::new();
        t.extend(None, &[1, 2]);
        assert_eq!(t.extend(None, &[2, 1]), vec![2, 3]);
        assert_eq!(t.positions(), &[0, 1, 0, 1]);
        assert_eq!(t.ancestry(&[3]).of(0), &[2, 3]);
    }

    #[test]
    fn nodes_that_are_not_in_the_tree_add_and_see_nothing() {
        let mut t = PrefixTree::new();
        t.extend(None, &[1, 2]);
        assert!(t.extend(Some(2), &[3]).is_empty());
        assert_eq!(t.len(), 2);
        let anc = t.ancestry(&[1, 7]);
        assert_eq!(anc.of(0), &[0, 1]);
        assert!(anc.of(1).is_empty());
        assert_eq!(anc.query_nodes().collect::<Vec<_>>(), vec![1]);
    }
}
