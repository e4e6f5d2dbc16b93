//! The fuzz loop of svcplane's fuzz tests, and the input mutators they share.
//!
//! Not cargo-fuzz: the repo pins a stable toolchain, so the targets are ordinary
//! tests driving proptest strategies. [`run`] draws inputs until its budget is
//! spent (`SVCPLANE_FUZZ_SECONDS`, else `SVCPLANE_FUZZ_CASES`, default 256 so
//! `make test` stays fast), catches panics, shrinks a failing input to a
//! minimal one and fails the test with it. It prints
//! `fuzz <target>: N inputs (R refused, P reached), 0 panics`.

use std::cell::RefCell;
use std::fmt::Debug;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value as Json, json};

/// Inputs per target when no budget is set: a few seconds in `make test`.
const DEFAULT_CASES: u64 = 256;

/// Most shrink steps spent on one failure.
const MAX_SHRINK_STEPS: usize = 4096;

/// What happened to one input that broke nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered with an error before the code under test (e.g. not an object
    /// the apiserver would store); the check made sure the error is clear.
    Refused,
    /// Got through to the code under test.
    Reached,
}

/// How long a target runs.
#[derive(Clone, Copy, Debug)]
enum Budget {
    Cases(u64),
    Until(Instant),
}

impl Budget {
    fn from_env() -> Self {
        let var = |name| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        match (var("SVCPLANE_FUZZ_SECONDS"), var("SVCPLANE_FUZZ_CASES")) {
            (Some(seconds), _) => Budget::Until(Instant::now() + Duration::from_secs(seconds)),
            (None, cases) => Budget::Cases(cases.unwrap_or(DEFAULT_CASES)),
        }
    }

    fn more(self, tried: u64) -> bool {
        match self {
            Budget::Cases(cases) => tried < cases,
            Budget::Until(deadline) => Instant::now() < deadline,
        }
    }
}

thread_local! {
    /// The last panic message on a thread that is fuzzing (`None` when not).
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Panics on a fuzzing thread are recorded, not printed (shrinking panics
/// hundreds of times); on other threads the previous hook runs as before.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let fuzzing = CAUGHT.with(|caught| {
                let mut caught = caught.borrow_mut();
                caught.as_mut().map(|slot| *slot = info.to_string()).is_some()
            });
            if !fuzzing {
                previous(info);
            }
        }));
    });
}

/// Runs `check` on one input: `Err` for a panic or a broken invariant.
fn attempt<T>(check: &impl Fn(&T) -> Result<Outcome, String>, input: &T) -> Result<Outcome, String> {
    CAUGHT.with(|caught| *caught.borrow_mut() = Some(String::new()));
    let result = catch_unwind(AssertUnwindSafe(|| check(input)));
    let message = CAUGHT.with(|caught| caught.borrow_mut().take()).unwrap_or_default();
    result.unwrap_or_else(|_| Err(format!("panicked: {message}")))
}

/// Fuzzes `check` with inputs from `strategy` within the budget; fails with
/// the minimal failing input if one panics or breaks an invariant. Seeded
/// runs (`make test`) always try the same inputs; timed ones (`make fuzz`)
/// draw new ones each run. Returns the number of inputs tried.
pub fn run<S>(target: &str, strategy: S, check: impl Fn(&S::Value) -> Result<Outcome, String>) -> u64
where
    S: Strategy,
    S::Value: Debug,
{
    install_panic_hook();
    let budget = Budget::from_env();
    let mut runner = match budget {
        Budget::Cases(_) => TestRunner::deterministic(),
        Budget::Until(_) => TestRunner::new(Config::default()),
    };
    let (mut tried, mut refused) = (0u64, 0u64);
    while budget.more(tried) {
        let mut tree = match strategy.new_tree(&mut runner) {
            Ok(tree) => tree,
            Err(reason) => panic!("fuzz {target}: the strategy gave no input: {reason}"),
        };
        tried += 1;
        match attempt(&check, &tree.current()) {
            Ok(Outcome::Refused) => refused += 1,
            Ok(Outcome::Reached) => {}
            Err(error) => {
                let (input, error) = shrink(&mut tree, &check, error);
                panic!("fuzz {target}: input {tried} failed: {error}\nminimal input: {input:#?}");
            }
        }
    }
    println!("fuzz {target}: {tried} inputs ({refused} refused, {} reached), 0 panics", tried - refused);
    tried
}

/// proptest's shrink loop: simplify while the input still fails, step back
/// (complicate) when it passes.
fn shrink<T: ValueTree>(
    tree: &mut T,
    check: &impl Fn(&T::Value) -> Result<Outcome, String>,
    error: String,
) -> (T::Value, String) {
    let mut minimal = (tree.current(), error);
    let mut steps = 0;
    if !tree.simplify() {
        return minimal;
    }
    while steps < MAX_SHRINK_STEPS {
        steps += 1;
        let current = tree.current();
        let next = match attempt(check, &current) {
            Ok(_) => tree.complicate(),
            Err(error) => {
                minimal = (current, error);
                tree.simplify()
            }
        };
        if !next {
            break;
        }
    }
    minimal
}

/// Strings the objects' fields take, valid and not: IPs of both families and
/// near misses, the enum values the planners branch on, and odd text.
pub fn word() -> impl Strategy<Value = String> {
    let known = prop::sample::select(vec![
        "",
        "None",
        "10.96.0.1",
        "10.96.0.10",
        "10.1.0.1",
        "10.1.0.2",
        "10.96.0.300",
        "010.96.0.1",
        "fd00::1",
        "fd00::a",
        "::ffff:10.1.0.1",
        "fe80::1%eth0",
        "10.1.0.0/24",
        " 10.1.0.1",
        "IPv4",
        "IPv6",
        "FQDN",
        "TCP",
        "UDP",
        "SCTP",
        "ClusterIP",
        "NodePort",
        "LoadBalancer",
        "ExternalName",
        "Local",
        "Cluster",
        "SingleStack",
        "PreferDualStack",
        "RequireDualStack",
        "PreferClose",
        "app",
        "web",
        "http",
        "node-1",
        "zone-a",
        "True",
        "False",
        "Running",
        "Succeeded",
        "Failed",
        "Always",
        "web-abc12",
    ]);
    prop_oneof![
        6 => known.prop_map(str::to_owned),
        1 => ".{0,12}",
        1 => "[a-z0-9.-]{60,70}",
    ]
}

/// Any JSON value, with the numbers and strings that sit on field limits.
pub fn garbage() -> impl Strategy<Value = Json> {
    let number = prop_oneof![
        prop::sample::select(vec![
            0i64,
            -1,
            1,
            80,
            8080,
            30000,
            32767,
            65535,
            65536,
            1 << 31,
            -(1 << 31) - 1
        ])
        .prop_map(Json::from),
        any::<i64>().prop_map(Json::from),
        Just(json!(u64::MAX)),
        Just(json!(1.5)),
    ];
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        number,
        word().prop_map(Json::String)
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
            prop::collection::btree_map(word(), inner, 0..4)
                .prop_map(|m| Json::Object(m.into_iter().collect())),
        ]
    })
}

/// One edit of [`mutated`].
#[derive(Clone, Debug)]
enum Edit {
    /// The node becomes any JSON value: mostly another type, which
    /// deserialization refuses.
    Replace(Json),
    /// The node keeps its type, so the object still deserializes: another
    /// string or number, the other bool, an array without its first item or
    /// with it twice, an object without one key.
    Alike(String, i64),
}

impl Edit {
    fn apply(self, node: &mut Json) {
        match (self, node) {
            (Edit::Replace(with), node) => *node = with,
            (Edit::Alike(word, _), node @ (Json::String(_) | Json::Null)) => *node = Json::String(word),
            (Edit::Alike(_, n), Json::Number(number)) => *number = n.into(),
            (Edit::Alike(..), Json::Bool(b)) => *b = !*b,
            (Edit::Alike(_, n), Json::Array(items)) if !items.is_empty() => {
                if n % 2 == 0 {
                    items.remove(0);
                } else {
                    items.push(items[0].clone());
                }
            }
            (Edit::Alike(_, n), Json::Object(fields)) if !fields.is_empty() => {
                let key = fields.keys().nth(n.unsigned_abs() as usize % fields.len()).cloned();
                key.map(|key| fields.remove(&key));
            }
            (Edit::Alike(..), _) => {}
        }
    }
}

/// `base` with up to two edits ([`Edit`]) at any depth, the root included;
/// a third of the inputs are left as they are.
pub fn mutated(base: impl Strategy<Value = Json>) -> impl Strategy<Value = Json> {
    let number = prop_oneof![
        prop::sample::select(vec![0i64, -1, 1, 80, 8080, 30000, 65535, 65536, 1 << 31, -(1 << 31) - 1]),
        any::<i64>(),
    ];
    let edit = prop_oneof![
        3 => (word(), number).prop_map(|(word, n)| Edit::Alike(word, n)),
        1 => garbage().prop_map(Edit::Replace),
    ];
    (base, prop::collection::vec((any::<usize>(), edit), 0..3)).prop_map(|(mut value, edits)| {
        for (at, edit) in edits {
            let count = nodes(&value);
            if let Some(node) = nth_node(&mut value, at % count) {
                edit.apply(node);
            }
        }
        value
    })
}

fn nodes(value: &Json) -> usize {
    1 + match value {
        Json::Array(items) => items.iter().map(nodes).sum(),
        Json::Object(fields) => fields.values().map(nodes).sum(),
        _ => 0,
    }
}

/// The `n`th node in pre-order.
fn nth_node(value: &mut Json, mut n: usize) -> Option<&mut Json> {
    if n == 0 {
        return Some(value);
    }
    n -= 1;
    let children: Vec<&mut Json> = match value {
        Json::Array(items) => items.iter_mut().collect(),
        Json::Object(fields) => fields.values_mut().collect(),
        _ => return None,
    };
    for child in children {
        let size = nodes(child);
        if n < size {
            return nth_node(child, n);
        }
        n -= size;
    }
    None
}

/// One edit of [`bytes`].
#[derive(Clone, Debug)]
enum ByteEdit {
    Truncate,
    Flip(u8),
    Insert(u8),
    Remove,
}

/// A request body, shown as escaped text (not a list of numbers) when a
/// failing input is reported.
#[derive(Clone, PartialEq, Eq)]
pub struct Body(pub Vec<u8>);

impl Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "b\"{}\"", self.0.escape_ascii())
    }
}

/// Bytes for a request body: `json` serialized, sometimes with byte edits
/// (truncated, flipped, inserted, removed bytes), or plain random bytes.
pub fn bytes(json: impl Strategy<Value = Json>) -> impl Strategy<Value = Body> {
    let edit = prop_oneof![
        Just(ByteEdit::Truncate),
        any::<u8>().prop_map(ByteEdit::Flip),
        any::<u8>().prop_map(ByteEdit::Insert),
        Just(ByteEdit::Remove),
    ];
    let edited = (json, prop::collection::vec((any::<usize>(), edit), 0..3)).prop_map(|(json, edits)| {
        let mut bytes = json.to_string().into_bytes();
        for (at, edit) in edits {
            let at = at % (bytes.len() + 1);
            match edit {
                ByteEdit::Truncate => bytes.truncate(at),
                ByteEdit::Insert(byte) => bytes.insert(at, byte),
                ByteEdit::Flip(mask) if at < bytes.len() => bytes[at] ^= mask,
                ByteEdit::Remove if at < bytes.len() => drop(bytes.remove(at)),
                ByteEdit::Flip(_) | ByteEdit::Remove => {}
            }
        }
        bytes
    });
    prop_oneof![4 => edited, 1 => prop::collection::vec(any::<u8>(), 0..64)].prop_map(Body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_numbered_in_pre_order() {
        let mut value = json!({"a": [1, {"b": 2}], "c": 3});
        assert_eq!(nodes(&value), 6);
        assert_eq!(nth_node(&mut value, 4).cloned(), Some(json!(2)));
        assert_eq!(nth_node(&mut value, 5).cloned(), Some(json!(3)));
        assert_eq!(nth_node(&mut value, 6), None);
    }

    #[test]
    fn a_failure_is_shrunk_to_a_minimal_input() {
        let result =
            std::panic::catch_unwind(|| {
                run("shrink", 0u32..1000, |n| {
                    if *n >= 10 { panic!("too big: {n}") } else { Ok(Outcome::Reached) }
                })
            });
        let message = result.err().and_then(|e| e.downcast::<String>().ok()).map(|m| *m).unwrap_or_default();
        assert!(message.contains("minimal input: 10"), "{message}");
        assert!(message.contains("too big: 10"), "{message}");
    }
}
