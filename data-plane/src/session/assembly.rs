//! Puts a plan back together from the parts it travels in. The control
//! plane sends a plan's parts consecutively on one ordered stream, so a part
//! that does not continue the plan in hand (another version, a gap) means
//! the rest of that plan is not coming: it is dropped, and the node keeps
//! running what it last applied until a whole plan arrives.

use kt_proto::internal::{Assignment, PipelineSpec};

/// A whole plan: every pipeline of one plan version.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub version: i64,
    pub pipelines: Vec<PipelineSpec>,
}

#[derive(Debug, Default)]
pub struct PlanAssembler {
    pending: Option<Pending>,
}

#[derive(Debug)]
struct Pending {
    version: i64,
    next: u32,
    parts: u32,
    pipelines: Vec<PipelineSpec>,
}

impl PlanAssembler {
    /// Takes the next part; returns the plan once its last part is in.
    pub fn accept(&mut self, part: Assignment) -> Option<Plan> {
        let parts = part.parts.max(1);
        if part.part == 0 {
            if let Some(dropped) = self.pending.take() {
                tracing::warn!(
                    plan_version = dropped.version,
                    received = dropped.next,
                    parts = dropped.parts,
                    "an unfinished assignment was replaced by a newer one"
                );
            }
            self.pending = Some(Pending { version: part.plan_version, next: 0, parts, pipelines: Vec::new() });
        }
        let Some(pending) = self.pending.as_mut() else {
            tracing::warn!(
                plan_version = part.plan_version,
                part = part.part,
                "assignment part without its start; ignored"
            );
            return None;
        };
        if (pending.version, pending.next, pending.parts) != (part.plan_version, part.part, parts) {
            tracing::warn!(
                plan_version = part.plan_version,
                part = part.part,
                parts,
                expected_version = pending.version,
                expected_part = pending.next,
                "assignment part out of sequence; the unfinished plan is dropped"
            );
            self.pending = None;
            return None;
        }
        pending.pipelines.extend(part.pipelines);
        pending.next += 1;
        if pending.next < pending.parts {
            return None;
        }
        let done = self.pending.take().expect("just checked");
        Some(Plan { version: done.version, pipelines: done.pipelines })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kt_proto::v1::Trigger;

    fn spec(id: &str) -> PipelineSpec {
        PipelineSpec { trigger: Some(Trigger { id: id.into(), ..Default::default() }) }
    }

    fn part(version: i64, part: u32, parts: u32, ids: &[&str]) -> Assignment {
        Assignment { plan_version: version, part, parts, pipelines: ids.iter().map(|id| spec(id)).collect() }
    }

    fn ids(plan: &Plan) -> Vec<String> {
        plan.pipelines.iter().map(|p| p.trigger.as_ref().unwrap().id.clone()).collect()
    }

    #[test]
    fn test_a_plan_is_whole_only_after_its_last_part() {
        let mut a = PlanAssembler::default();
        assert_eq!(a.accept(part(5, 0, 3, &["a", "b"])), None);
        assert_eq!(a.accept(part(5, 1, 3, &["c"])), None);
        let plan = a.accept(part(5, 2, 3, &["d"])).expect("whole");
        assert_eq!((plan.version, ids(&plan)), (5, vec!["a".into(), "b".into(), "c".into(), "d".into()]));
        // A single-message plan, also as an older control plane sends it.
        assert_eq!(ids(&a.accept(part(6, 0, 1, &["x"])).unwrap()), ["x"]);
        assert_eq!(ids(&a.accept(part(7, 0, 0, &["y"])).unwrap()), ["y"]);
    }

    #[test]
    fn test_a_broken_sequence_drops_the_unfinished_plan() {
        let mut a = PlanAssembler::default();
        // A newer plan starts before the older one finished: the newer wins.
        assert_eq!(a.accept(part(1, 0, 2, &["old"])), None);
        assert_eq!(a.accept(part(2, 0, 2, &["new1"])), None);
        assert_eq!(ids(&a.accept(part(2, 1, 2, &["new2"])).unwrap()), ["new1", "new2"]);

        // A gap, another version mid-plan, a part without its start.
        assert_eq!(a.accept(part(3, 0, 3, &["a"])), None);
        assert_eq!(a.accept(part(3, 2, 3, &["c"])), None);
        assert_eq!(a.accept(part(3, 1, 3, &["b"])), None, "the plan was dropped at the gap");
        assert_eq!(a.accept(part(4, 0, 2, &["a"])), None);
        assert_eq!(a.accept(part(9, 1, 2, &["b"])), None);
        assert_eq!(a.accept(part(4, 1, 2, &["b"])), None, "dropped at the version change");
    }
}
