//! Scopes: named sets of method and path rules a token may be limited to. The control plane
//! checks rules with [`check_rule`] and names with [`check_name`]; the filter compiles a
//! scope's rules once per version ([`Compiled`]) and matches each request against the
//! compiled form.
//!
//! A rule's `path` is `/` followed by `/`-separated segments; a segment is a literal, or `*`
//! for exactly one segment, and the last one may be `**` for any rest (none included:
//! `/orders/**` covers `/orders` and everything below it). `methods` absent: any method.
//!
//! A request path is matched as Envoy routes it (the listener normalises it; see the
//! README), without its query. A path this module cannot take at face value matches no
//! rule ([`RequestPath::parse`]): so a scoped token is refused rather than let through on a
//! path the upstream could read otherwise.

use serde::{Deserialize, Serialize};

/// Longest scope name.
pub const MAX_NAME: usize = 64;
/// Longest description.
pub const MAX_DESCRIPTION: usize = 500;
/// Most rules per scope.
pub const MAX_RULES: usize = 100;
/// Longest rule path.
pub const MAX_PATH: usize = 512;
/// Most methods per rule.
pub const MAX_METHODS: usize = 16;
/// Longest method name.
pub const MAX_METHOD: usize = 20;
/// Most scopes one token may carry.
pub const MAX_TOKEN_SCOPES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Upper-case method names; absent: any method.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_list"
    )]
    pub methods: Option<Vec<String>>,
    pub path: String,
}

/// `methods` may be left out (any method) but not be `null`: one way to say "any", as the
/// OpenAPI document states it.
fn present_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    Vec::<String>::deserialize(d).map(Some)
}

/// A scope as the filter receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncScope {
    pub name: String,
    pub rules: Vec<Rule>,
    /// The version of the scope's last change.
    pub version: u64,
}

/// Checks a scope name: 1 to [`MAX_NAME`] characters of `a-z`, `0-9`, `:`, `.`, `_`, `-`,
/// starting with a letter or digit (so it can stand in `WWW-Authenticate`'s `scope="..."`
/// and a space-separated identity header unquoted).
pub fn check_name(name: &str) -> Result<(), String> {
    if is_name(name.as_bytes()) {
        Ok(())
    } else {
        Err(format!(
            "must be 1 to {MAX_NAME} characters of a-z, 0-9, ':', '.', '_' or '-', starting with a letter or digit"
        ))
    }
}

/// Whether `name` passes [`check_name`], without allocating (the filter checks the names it
/// puts in headers).
pub fn is_name(name: &[u8]) -> bool {
    name.first().is_some_and(u8::is_ascii_alphanumeric)
        && name.len() <= MAX_NAME
        && name.iter().all(|&b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b':' | b'.' | b'_' | b'-')
        })
}

/// Characters a literal path segment may hold: RFC 3986 `pchar` without `%` (an encoded
/// byte could be read otherwise upstream) and without `;` (path parameters).
fn segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'+'
                | b','
                | b'='
                | b':'
                | b'@'
        )
}

/// Checks one rule; `Err((field, message))` names `methods` or `path`.
pub fn check_rule(rule: &Rule) -> Result<(), (&'static str, String)> {
    if let Some(methods) = &rule.methods {
        if methods.is_empty() || methods.len() > MAX_METHODS {
            return Err((
                "methods",
                format!("must list 1 to {MAX_METHODS} methods, or be left out for any method"),
            ));
        }
        for m in methods {
            if m.is_empty() || m.len() > MAX_METHOD || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err((
                    "methods",
                    format!("must be upper-case method names such as GET (1 to {MAX_METHOD} letters A-Z)"),
                ));
            }
        }
    }
    check_path(&rule.path).map_err(|m| ("path", m))
}

fn check_path(path: &str) -> Result<(), String> {
    if path.len() > MAX_PATH {
        return Err(format!("must be at most {MAX_PATH} characters long"));
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err("must start with '/'".into());
    };
    if rest.is_empty() {
        return Ok(());
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len() - 1;
    for (i, s) in segments.iter().enumerate() {
        match *s {
            "" => return Err("must not hold an empty segment ('//' or a trailing '/')".into()),
            "." | ".." => return Err("must not hold '.' or '..' segments".into()),
            "*" => {}
            "**" if i == last => {}
            "**" => return Err("may hold '**' only as its last segment ('/orders/**')".into()),
            lit if lit.bytes().all(segment_byte) => {}
            _ => {
                return Err(
                    "segments are '*', a trailing '**', or literal characters (letters, digits, -._~!$&'()+,=:@)"
                        .into(),
                )
            }
        }
    }
    Ok(())
}

/// A request path as matched: the part before `?`, split into segments. `None` (matches no
/// rule): not starting with `/`, an empty segment (`//`), a `.` or `..` segment, a `\`, a `;`,
/// a `#`, or an encoded `.`, `/` or `\` (`%2e`, `%2f`, `%5c`).
#[derive(Debug, Clone, Copy)]
pub struct RequestPath<'a> {
    /// Without the leading `/`; empty for `/`.
    rest: &'a [u8],
    /// Where each segment lies in `rest`, split once for every rule to compare by index;
    /// `count` is `None` for a path of more than [`SPLIT_SEGMENTS`] segments, which the
    /// rules then split as they go.
    bounds: [(u32, u32); SPLIT_SEGMENTS],
    count: Option<usize>,
}

/// Segments a request path is split into up front.
const SPLIT_SEGMENTS: usize = 24;

impl<'a> RequestPath<'a> {
    pub fn parse(raw: &'a [u8]) -> Option<RequestPath<'a>> {
        let end = raw.iter().position(|&b| b == b'?').unwrap_or(raw.len());
        let path = &raw[..end];
        let rest = path.strip_prefix(b"/")?;
        if rest
            .iter()
            .any(|&b| matches!(b, b'\\' | b';' | b'#') || !(0x21..=0x7e).contains(&b))
        {
            return None;
        }
        for w in rest.windows(3) {
            if w[0] == b'%'
                && (w[1..].eq_ignore_ascii_case(b"2e")
                    || w[1..].eq_ignore_ascii_case(b"2f")
                    || w[1..].eq_ignore_ascii_case(b"5c"))
            {
                return None;
            }
        }
        let mut bounds = [(0u32, 0u32); SPLIT_SEGMENTS];
        let mut count = Some(0);
        if !rest.is_empty() {
            let mut start = 0usize;
            for s in rest.split(|&b| b == b'/') {
                if s.is_empty() || s == b"." || s == b".." {
                    return None;
                }
                count = match count {
                    Some(n) if n < SPLIT_SEGMENTS => {
                        bounds[n] = (start as u32, (start + s.len()) as u32);
                        Some(n + 1)
                    }
                    _ => None,
                };
                start += s.len() + 1;
            }
        }
        Some(RequestPath {
            rest,
            bounds,
            count,
        })
    }

    fn segments(&self) -> impl Iterator<Item = &'a [u8]> {
        let rest = self.rest;
        rest.split(|&b| b == b'/').filter(move |_| !rest.is_empty())
    }

    /// The segments split up front, if the path was short enough to be.
    fn split(&self) -> Option<&[(u32, u32)]> {
        self.count.map(|n| &self.bounds[..n])
    }

    fn segment(&self, (start, end): (u32, u32)) -> &'a [u8] {
        self.rest
            .get(start as usize..end as usize)
            .unwrap_or_default()
    }
}

/// The methods of a rule; `None`: any.
type Methods = Option<Box<[Box<[u8]>]>>;

fn method_ok(methods: &Methods, method: &[u8]) -> bool {
    methods
        .as_ref()
        .is_none_or(|ms| ms.iter().any(|m| **m == *method))
}

/// One segment position of a scope's rules, merged into a tree: a request walks it segment by
/// segment, so that rules sharing their leading segments are compared once, and a literal is
/// found by binary search among its siblings rather than rule by rule.
#[derive(Debug, Clone, Default)]
struct Node {
    /// Literal next segments, sorted.
    literals: Vec<(Box<[u8]>, Node)>,
    /// `*`: any one next segment.
    one: Option<Box<Node>>,
    /// Rules that end here.
    end: Vec<Methods>,
    /// Rules that end here with `/**`: this segment and anything below.
    rest: Vec<Methods>,
}

impl Node {
    fn insert(&mut self, segments: &[&str], rest: bool, methods: Methods) {
        let Some((first, tail)) = segments.split_first() else {
            if rest {
                self.rest.push(methods);
            } else {
                self.end.push(methods);
            }
            return;
        };
        let child = if *first == "*" {
            self.one.get_or_insert_with(Box::default)
        } else {
            let key = first.as_bytes();
            let at = match self.literals.binary_search_by(|(k, _)| (**k).cmp(key)) {
                Ok(at) => at,
                Err(at) => {
                    self.literals.insert(at, (key.into(), Node::default()));
                    at
                }
            };
            &mut self.literals[at].1
        };
        child.insert(tail, rest, methods);
    }

    /// Whether a rule at or below this node covers `method` on `segments`; `more`: the path
    /// goes on beyond `segments` (a path longer than any rule, cut short).
    fn allows(&self, method: &[u8], segments: &[&[u8]], more: bool) -> bool {
        if self.rest.iter().any(|m| method_ok(m, method)) {
            return true;
        }
        let Some((first, tail)) = segments.split_first() else {
            return !more && self.end.iter().any(|m| method_ok(m, method));
        };
        if let Ok(at) = self.literals.binary_search_by(|(k, _)| (**k).cmp(first)) {
            if self.literals[at].1.allows(method, tail, more) {
                return true;
            }
        }
        self.one
            .as_ref()
            .is_some_and(|n| n.allows(method, tail, more))
    }
}

/// Segments a rule may hold at most (`MAX_PATH` characters, two per segment).
const RULE_SEGMENTS: usize = MAX_PATH / 2;

/// A scope's rules, ready to match.
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    root: Node,
}

impl Compiled {
    /// Compiles checked rules; a rule that does not pass [`check_rule`] matches nothing.
    pub fn new(rules: &[Rule]) -> Compiled {
        let mut root = Node::default();
        for r in rules.iter().filter(|r| check_rule(r).is_ok()) {
            let mut segs: Vec<&str> = r
                .path
                .strip_prefix('/')
                .unwrap_or_default()
                .split('/')
                .filter(|s| !s.is_empty())
                .collect();
            let rest = segs.last() == Some(&"**");
            if rest {
                segs.pop();
            }
            let methods = r.methods.as_ref().map(|ms| {
                ms.iter()
                    .map(|m| m.as_bytes().to_vec().into_boxed_slice())
                    .collect()
            });
            root.insert(&segs, rest, methods);
        }
        Compiled { root }
    }

    /// Whether any rule covers `method` on `path`.
    pub fn allows(&self, method: &[u8], path: &RequestPath<'_>) -> bool {
        match path.split() {
            Some(bounds) => {
                let mut segs: [&[u8]; SPLIT_SEGMENTS] = [&[]; SPLIT_SEGMENTS];
                for (slot, &at) in segs.iter_mut().zip(bounds) {
                    *slot = path.segment(at);
                }
                self.root.allows(method, &segs[..bounds.len()], false)
            }
            None => {
                // Longer than any rule can be followed: what lies beyond only `/**` covers.
                let mut all = path.segments();
                let segs: Vec<&[u8]> = all.by_ref().take(RULE_SEGMENTS + 1).collect();
                self.root.allows(method, &segs, all.next().is_some())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(methods: Option<&[&str]>, path: &str) -> Rule {
        Rule {
            methods: methods.map(|ms| ms.iter().map(|m| m.to_string()).collect()),
            path: path.into(),
        }
    }

    fn allows(rules: &[Rule], method: &str, path: &str) -> bool {
        RequestPath::parse(path.as_bytes())
            .is_some_and(|p| Compiled::new(rules).allows(method.as_bytes(), &p))
    }

    #[test]
    fn exact_one_segment_and_rest() {
        let r = [
            rule(Some(&["GET"]), "/orders/**"),
            rule(None, "/items/*/price"),
            rule(Some(&["POST", "PUT"]), "/carts"),
        ];
        assert!(allows(&r, "GET", "/orders"));
        assert!(allows(&r, "GET", "/orders/7/lines?x=1"));
        assert!(!allows(&r, "POST", "/orders/7"));
        assert!(!allows(&r, "GET", "/ordersx"));
        assert!(allows(&r, "DELETE", "/items/9/price"));
        assert!(!allows(&r, "GET", "/items/9/price/x"));
        assert!(!allows(&r, "GET", "/items/price"));
        assert!(allows(&r, "PUT", "/carts"));
        assert!(!allows(&r, "GET", "/carts"));
        assert!(!allows(&r, "PUT", "/carts/1"));
        assert!(allows(&[rule(None, "/**")], "GET", "/"));
        assert!(allows(&[rule(None, "/")], "GET", "/?q"));
        assert!(!allows(&[rule(None, "/")], "GET", "/a"));
    }

    /// The rules' meaning, one rule at a time: what the tree must agree with.
    fn oracle(rules: &[Rule], method: &str, path: &str) -> bool {
        let Some(p) = RequestPath::parse(path.as_bytes()) else {
            return false;
        };
        let got: Vec<&[u8]> = p.segments().collect();
        rules.iter().filter(|r| check_rule(r).is_ok()).any(|r| {
            let mut want: Vec<&str> = r.path[1..].split('/').filter(|s| !s.is_empty()).collect();
            let rest = want.last() == Some(&"**");
            if rest {
                want.pop();
            }
            r.methods
                .as_ref()
                .is_none_or(|ms| ms.iter().any(|m| m == method))
                && got.len() >= want.len()
                && (rest || got.len() == want.len())
                && want
                    .iter()
                    .zip(&got)
                    .all(|(w, g)| *w == "*" || w.as_bytes() == *g)
        })
    }

    proptest::proptest! {
        #[test]
        fn the_tree_agrees_with_the_rules_one_by_one(
            rules in proptest::collection::vec(
                (proptest::option::of(proptest::sample::subsequence(vec!["GET", "POST", "PUT"], 1..3)),
                 proptest::collection::vec(proptest::sample::select(vec!["a", "b", "*"]), 0..5),
                 proptest::bool::ANY),
                0..8),
            method in proptest::sample::select(vec!["GET", "POST", "DELETE"]),
            path in proptest::collection::vec(proptest::sample::select(vec!["a", "b", "c"]), 0..7),
        ) {
            let rules: Vec<Rule> = rules
                .into_iter()
                .map(|(ms, segs, rest)| {
                    let mut p = format!("/{}", segs.join("/"));
                    if rest {
                        p = if p == "/" { "/**".into() } else { format!("{p}/**") };
                    }
                    rule(ms.as_deref(), &p)
                })
                .collect();
            let path = format!("/{}", path.join("/"));
            proptest::prop_assert_eq!(allows(&rules, method, &path), oracle(&rules, method, &path));
        }
    }

    #[test]
    fn methods_are_a_list_or_left_out_never_null() {
        let r: Rule = serde_json::from_str(r#"{"path":"/a"}"#).unwrap();
        assert_eq!(r.methods, None);
        let r: Rule = serde_json::from_str(r#"{"methods":["GET"],"path":"/a"}"#).unwrap();
        assert_eq!(r.methods, Some(vec!["GET".to_string()]));
        assert!(serde_json::from_str::<Rule>(r#"{"methods":null,"path":"/a"}"#).is_err());
    }

    #[test]
    fn long_paths_match_as_short_ones_do() {
        let deep = format!("/a{}", "/x".repeat(40));
        let r = [rule(None, "/a/**"), rule(Some(&["GET"]), &deep)];
        assert!(allows(&r[..1], "GET", &deep));
        assert!(allows(&r[1..], "GET", &deep));
        assert!(!allows(&r[1..], "POST", &deep));
        assert!(!allows(&r[1..], "GET", &format!("{deep}/x")));
        assert!(!allows(&r[1..], "GET", &deep[..deep.len() - 2]));
        let deeper = format!("/a{}", "/x".repeat(400));
        assert!(allows(&r[..1], "GET", &deeper));
        assert!(!allows(&[rule(None, "/a/*")], "GET", &deeper));
        let exact = format!("/a{}", "/x".repeat(23));
        assert!(allows(&[rule(None, &exact)], "GET", &exact));
        assert!(!allows(&[rule(None, &exact)], "GET", &format!("{exact}/x")));
    }

    #[test]
    fn paths_that_could_be_read_otherwise_match_nothing() {
        let r = [rule(None, "/orders/**"), rule(None, "/orders/*")];
        for p in [
            "/orders/../admin",
            "/orders/./x",
            "//orders",
            "/orders//x",
            "/orders/%2e%2e/admin",
            "/orders/%2E%2E/admin",
            "/orders%2Fsecret",
            "/orders/a%2fb",
            "/orders/a%5cb",
            "/orders/a\\b",
            "/orders;x",
            "/orders/..;/admin",
            "/orders/x#frag",
            "orders",
            "",
            "/orders/a b",
        ] {
            assert!(!allows(&r, "GET", p), "{p}");
        }
        assert!(!allows(&r, "GET", "/ORDERS"), "case matters");
        assert!(
            allows(&r, "GET", "/orders/a%20b"),
            "other escapes are one segment"
        );
    }

    #[test]
    fn rules_and_names_are_checked() {
        for bad in [
            "", "orders", "/a//b", "/a/", "/**/x", "/a/../b", "/a%2fb", "/a;b", "/a b",
        ] {
            assert!(check_rule(&rule(None, bad)).is_err(), "{bad}");
        }
        for good in ["/", "/**", "/a/*/b/**", "/v1/orders:search", "/a.b/~c"] {
            assert!(check_rule(&rule(None, good)).is_ok(), "{good}");
        }
        assert_eq!(
            check_rule(&rule(Some(&["get"]), "/")).unwrap_err().0,
            "methods"
        );
        assert_eq!(check_rule(&rule(Some(&[]), "/")).unwrap_err().0, "methods");
        assert!(check_name("orders:read").is_ok());
        for bad in ["", "Orders", ":x", "a b", "a\"b", &"a".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
