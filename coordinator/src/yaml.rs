//! Reading YAML that others wrote (operators' configs, agents' effective
//! configs) without trusting it.
//!
//! The parser (yaml-rust2) is driven as a stream of events, so nothing is
//! built that an alias could blow up. But it descends one call per level of
//! nesting: a body of a few kilobytes nested deep enough (`- - - - …` on one
//! line, or ever deeper indentation) would overflow the stack and abort the
//! process. Flow nesting (`[[[…`) is capped by the scanner at 255; block
//! nesting needs at least one more column per level, so bodies whose lines
//! start deeper than [`MAX_PREFIX`] columns are refused before the parser
//! sees them.

use yaml_rust2::parser::{EventReceiver, Parser};

/// Columns of indentation and block indicators (`-`, `?`, `:`) a line may
/// start with: about 64 levels of block nesting.
pub const MAX_PREFIX: usize = 128;

/// Why a body was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unread {
    /// Nested deeper than this reader follows.
    #[error("nested deeper than {MAX_PREFIX} columns")]
    TooDeep,
    /// Not YAML.
    #[error("not YAML: {0}")]
    Invalid(String),
}

/// Feeds the events of `text`'s first document to `receiver`.
///
/// ```
/// # use fleetplane_coordinator::yaml::{read, Unread};
/// struct Count(usize);
/// impl yaml_rust2::parser::EventReceiver for Count {
///     fn on_event(&mut self, _: yaml_rust2::Event) { self.0 += 1 }
/// }
/// let mut count = Count(0);
/// assert!(read("a: [1, 2]", &mut count).is_ok() && count.0 > 0);
/// assert_eq!(read(&"- ".repeat(100_000), &mut Count(0)), Err(Unread::TooDeep));
/// ```
pub fn read<R: EventReceiver>(text: &str, receiver: &mut R) -> Result<(), Unread> {
    let too_deep = text.lines().any(|line| {
        line.bytes()
            .take_while(|b| matches!(b, b' ' | b'\t' | b'-' | b'?' | b':'))
            .count()
            > MAX_PREFIX
    });
    if too_deep {
        return Err(Unread::TooDeep);
    }
    Parser::new_from_str(text)
        .load(receiver, false)
        .map_err(|e| Unread::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Depth {
        now: usize,
        max: usize,
    }

    impl EventReceiver for Depth {
        fn on_event(&mut self, event: yaml_rust2::Event) {
            match event {
                yaml_rust2::Event::SequenceStart(..) | yaml_rust2::Event::MappingStart(..) => {
                    self.now += 1;
                    self.max = self.max.max(self.now);
                }
                yaml_rust2::Event::SequenceEnd | yaml_rust2::Event::MappingEnd => self.now -= 1,
                _ => {}
            }
        }
    }

    fn depth(text: &str) -> Result<usize, Unread> {
        let mut d = Depth { now: 0, max: 0 };
        read(text, &mut d).map(|()| d.max)
    }

    #[test]
    fn deep_bodies_are_refused_before_the_parser_descends() {
        // Each would overflow the stack if parsed (one call per level).
        assert_eq!(depth(&format!("{}x", "- ".repeat(200_000))), Err(Unread::TooDeep));
        let staircase: String = (0..100).map(|i| format!("{}k{i}:\n", " ".repeat(2 * i))).collect();
        assert_eq!(depth(&staircase), Err(Unread::TooDeep));
        // Flow nesting is capped by the scanner itself.
        assert!(matches!(depth(&"[".repeat(100_000)), Err(Unread::Invalid(_))));
        // Ordinary configs are read.
        let shallow: String = (0..30).map(|i| format!("{}k{i}:\n", " ".repeat(2 * i))).collect();
        assert_eq!(depth(&format!("{shallow}{}v", " ".repeat(60))), Ok(30));
        assert_eq!(depth("receivers:\n  otlp:\n    protocols: {grpc: {}}\n"), Ok(5));
    }
}
