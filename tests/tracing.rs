//! rask speaks `tracing`: a `compute` span with its executor and task
//! count, a span per task at trace level, an event when a task errs; and
//! nothing at all without a subscriber (tracing's own guarantee, so not
//! tested here).

use std::sync::{Arc, Mutex};

use rask::{delayed, Config};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Records span names with their fields, and event messages.
#[derive(Default, Clone)]
struct Recorder {
    lines: Arc<Mutex<Vec<String>>>,
    next: Arc<Mutex<u64>>,
}

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={:?}", field.name(), value));
    }
}

impl Subscriber for Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut fields = Fields(format!("span {}", span.metadata().name()));
        span.record(&mut fields);
        self.lines.lock().unwrap().push(fields.0);
        let mut next = self.next.lock().unwrap();
        *next += 1;
        Id::from_u64(*next)
    }
    fn record(&self, _: &Id, values: &Record<'_>) {
        let mut fields = Fields("record".to_owned());
        values.record(&mut fields);
        self.lines.lock().unwrap().push(fields.0);
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields(format!("event {}", event.metadata().level()));
        event.record(&mut fields);
        self.lines.lock().unwrap().push(fields.0);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

fn inc(x: i64) -> i64 {
    x + 1
}

fn parse(s: String) -> Result<i64, std::num::ParseIntError> {
    s.parse()
}

#[test]
fn compute_and_tasks_have_spans_and_errors_have_events() {
    let recorder = Recorder::default();
    tracing::subscriber::with_default(recorder.clone(), || {
        let x = delayed!(inc(delayed!(inc(1))));
        assert_eq!(
            x.compute_with(&Config::synchronous().optimize(false))
                .unwrap(),
            3
        );
        let bad = delayed!(parse("x".to_string())?);
        assert!(bad.compute_with(&Config::synchronous()).is_err());
    });
    let lines = recorder.lines.lock().unwrap().clone();
    let has = |want: &str| lines.iter().any(|l| l.contains(want));
    assert!(has("span compute executor=sync"), "{lines:#?}");
    assert!(has("record tasks=2"), "{lines:#?}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("span task name=\"inc\""))
            .count(),
        2,
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("event DEBUG")
            && l.contains("task erred")
            && l.contains("parse")),
        "{lines:#?}"
    );
}
