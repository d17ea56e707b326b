//! The candidate-set scheduler's state, as a plain data structure with no I/O
//! so every rule is unit-tested: which sets are ready, which are granted to
//! which worker session, how much capacity each session has, and the
//! per-trigger in-flight limit. Ready sets are served round-robin across
//! triggers so one trigger's backlog does not starve another.

use std::collections::{HashMap, HashSet, VecDeque};

use uuid::Uuid;

pub type SetId = i64;
pub type TriggerId = Uuid;
pub type SessionId = Uuid;

/// A set granted to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub session: SessionId,
    pub set_id: SetId,
    pub trigger_id: TriggerId,
}

#[derive(Debug, Default)]
struct Session {
    credits: u32,
}

#[derive(Debug)]
pub struct Model {
    /// Ready sets per trigger, in arrival order.
    ready: HashMap<TriggerId, VecDeque<SetId>>,
    /// Triggers with ready sets, in round-robin order.
    rotation: VecDeque<TriggerId>,
    /// Every set the model holds (ready or in flight), to drop duplicates.
    known: HashSet<SetId>,
    in_flight: HashMap<SetId, (SessionId, TriggerId)>,
    /// In-flight sets announced ready again (ingest woke them, a completion
    /// made them ready): their worker's outcome may predate the news (it
    /// found the set empty just before a message arrived), so they are
    /// queued again when it comes back, whatever it says.
    rewake: HashSet<SetId>,
    in_flight_per_trigger: HashMap<TriggerId, u32>,
    limits: HashMap<TriggerId, u32>,
    default_limit: u32,
    sessions: HashMap<SessionId, Session>,
}

impl Model {
    pub fn new(default_limit: u32) -> Self {
        Self {
            ready: HashMap::new(),
            rotation: VecDeque::new(),
            known: HashSet::new(),
            in_flight: HashMap::new(),
            rewake: HashSet::new(),
            in_flight_per_trigger: HashMap::new(),
            limits: HashMap::new(),
            default_limit,
            sessions: HashMap::new(),
        }
    }

    /// Sets the per-trigger in-flight limit (the trigger's `max_in_flight`;
    /// 0 holds its sets back, for a disabled trigger).
    pub fn set_limit(&mut self, trigger: TriggerId, limit: u32) {
        self.limits.insert(trigger, limit);
    }

    /// Queues a set unless the model already holds it. Returns whether it
    /// was added; a set in flight is remembered and queued after its outcome.
    pub fn push_ready(&mut self, set_id: SetId, trigger: TriggerId) -> bool {
        if self.in_flight.contains_key(&set_id) {
            self.rewake.insert(set_id);
            return false;
        }
        if !self.known.insert(set_id) {
            return false;
        }
        let queue = self.ready.entry(trigger).or_default();
        if queue.is_empty() {
            self.rotation.push_back(trigger);
        }
        queue.push_back(set_id);
        true
    }

    pub fn add_session(&mut self, session: SessionId) {
        self.sessions.entry(session).or_default();
    }

    /// Removes a session; the sets it held go back to the ready queue (a
    /// stale claim in the database is fenced off by its lock id and released
    /// by the janitor).
    pub fn remove_session(&mut self, session: SessionId) -> Vec<SetId> {
        self.sessions.remove(&session);
        let orphaned: Vec<(SetId, TriggerId)> = self
            .in_flight
            .iter()
            .filter(|(_, (s, _))| *s == session)
            .map(|(set, (_, trigger))| (*set, *trigger))
            .collect();
        for (set, trigger) in &orphaned {
            self.finish(*set);
            self.push_ready(*set, *trigger);
        }
        orphaned.into_iter().map(|(set, _)| set).collect()
    }

    pub fn add_credits(&mut self, session: SessionId, credits: u32) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.credits = s.credits.saturating_add(credits);
        }
    }

    /// A granted set came back; its worker's capacity returns either way.
    /// Returns the set's trigger if it was in flight for that session; an
    /// outcome from a session that no longer holds the set (it was re-granted
    /// after its claim expired) changes nothing else.
    pub fn complete(&mut self, session: SessionId, set_id: SetId) -> Option<TriggerId> {
        self.add_credits(session, 1);
        match self.in_flight.get(&set_id) {
            Some((holder, _)) if *holder == session => {
                let rewake = self.rewake.contains(&set_id);
                let trigger = self.finish(set_id)?;
                if rewake {
                    self.push_ready(set_id, trigger);
                }
                Some(trigger)
            }
            _ => None,
        }
    }

    /// A claim expired: take the set back from whoever held it and queue it.
    pub fn reclaim(&mut self, set_id: SetId, trigger: TriggerId) {
        self.finish(set_id);
        self.push_ready(set_id, trigger);
    }

    /// Forgets a set entirely (e.g. its trigger was deleted).
    pub fn forget_trigger(&mut self, trigger: TriggerId) {
        if let Some(queue) = self.ready.remove(&trigger) {
            for set in queue {
                self.known.remove(&set);
            }
        }
        self.rotation.retain(|t| *t != trigger);
    }

    fn finish(&mut self, set_id: SetId) -> Option<TriggerId> {
        let (_, trigger) = self.in_flight.remove(&set_id)?;
        self.known.remove(&set_id);
        self.rewake.remove(&set_id);
        if let Some(n) = self.in_flight_per_trigger.get_mut(&trigger) {
            *n = n.saturating_sub(1);
        }
        Some(trigger)
    }

    /// Hands out as many grants as credits, ready sets and per-trigger limits
    /// allow: triggers in rotation, each grant to the session with the most
    /// credits so work spreads over nodes.
    pub fn dispatch(&mut self) -> Vec<Grant> {
        let mut grants = Vec::new();
        let mut skipped = 0;
        while skipped < self.rotation.len() {
            let Some(session) = self.best_session() else { break };
            let Some(trigger) = self.rotation.pop_front() else { break };
            let limit = self.limits.get(&trigger).copied().unwrap_or(self.default_limit);
            let in_flight = self.in_flight_per_trigger.entry(trigger).or_default();
            if *in_flight >= limit {
                // At its limit: keep its place, try the next trigger.
                self.rotation.push_back(trigger);
                skipped += 1;
                continue;
            }
            skipped = 0;
            let queue = self.ready.get_mut(&trigger).expect("rotation only holds triggers with ready sets");
            let set_id = queue.pop_front().expect("queues in rotation are not empty");
            if queue.is_empty() {
                self.ready.remove(&trigger);
            } else {
                self.rotation.push_back(trigger);
            }
            *in_flight += 1;
            self.in_flight.insert(set_id, (session, trigger));
            self.sessions.get_mut(&session).expect("best session exists").credits -= 1;
            grants.push(Grant { session, set_id, trigger_id: trigger });
        }
        grants
    }

    fn best_session(&self) -> Option<SessionId> {
        self.sessions.iter().filter(|(_, s)| s.credits > 0).max_by_key(|(id, s)| (s.credits, **id)).map(|(id, _)| *id)
    }

    pub fn ready_len(&self) -> usize {
        self.ready.values().map(VecDeque::len).sum()
    }

    pub fn in_flight_len(&self) -> usize {
        self.in_flight.len()
    }

    pub fn is_in_flight(&self, set_id: SetId) -> bool {
        self.in_flight.contains_key(&set_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: u128) -> TriggerId {
        Uuid::from_u128(n)
    }

    #[test]
    fn test_grants_need_credits_and_never_duplicate_a_set() {
        let mut m = Model::new(100);
        let s = Uuid::from_u128(1);
        assert!(m.push_ready(10, t(1)));
        assert!(!m.push_ready(10, t(1)), "a queued set is not queued twice");
        assert!(m.dispatch().is_empty(), "no session, no grant");
        m.add_session(s);
        assert!(m.dispatch().is_empty(), "no credits, no grant");
        m.add_credits(s, 5);
        let grants = m.dispatch();
        assert_eq!(grants, [Grant { session: s, set_id: 10, trigger_id: t(1) }]);
        assert!(!m.push_ready(10, t(1)), "an in-flight set is not queued again");
        assert_eq!(m.ready_len(), 0);
        assert_eq!(m.complete(s, 10), Some(t(1)));
        assert_eq!(m.ready_len(), 1, "announced while in flight: queued again after its outcome");
        assert!(!m.push_ready(10, t(1)), "a queued set is not queued twice");
        assert_eq!(m.dispatch().len(), 1);
        assert_eq!(m.complete(s, 10), Some(t(1)));
        assert_eq!(m.ready_len(), 0, "not announced while in flight: not queued again");
        assert!(m.push_ready(10, t(1)), "after its outcome it can be queued again");
    }

    #[test]
    fn test_triggers_are_served_round_robin() {
        let mut m = Model::new(100);
        for set in 0..3 {
            m.push_ready(set, t(1));
        }
        m.push_ready(100, t(2));
        let s = Uuid::from_u128(1);
        m.add_session(s);
        m.add_credits(s, 2);
        let grants: Vec<_> = m.dispatch().iter().map(|g| g.set_id).collect();
        assert_eq!(grants, [0, 100]);
    }

    #[test]
    fn test_per_trigger_limit_holds_back_only_that_trigger() {
        let mut m = Model::new(100);
        m.set_limit(t(1), 1);
        m.push_ready(1, t(1));
        m.push_ready(2, t(1));
        m.push_ready(3, t(2));
        let s = Uuid::from_u128(1);
        m.add_session(s);
        m.add_credits(s, 10);
        let mut grants: Vec<_> = m.dispatch().iter().map(|g| g.set_id).collect();
        grants.sort();
        assert_eq!(grants, [1, 3]);
        m.complete(s, 1);
        assert_eq!(m.dispatch().iter().map(|g| g.set_id).collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn test_a_zero_limit_holds_a_disabled_trigger_back() {
        let mut m = Model::new(100);
        m.set_limit(t(1), 0);
        m.push_ready(1, t(1));
        m.push_ready(2, t(2));
        let s = Uuid::from_u128(1);
        m.add_session(s);
        m.add_credits(s, 10);
        assert_eq!(m.dispatch().iter().map(|g| g.set_id).collect::<Vec<_>>(), [2]);
        assert_eq!(m.ready_len(), 1);
        m.set_limit(t(1), 5);
        assert_eq!(m.dispatch().iter().map(|g| g.set_id).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn test_grants_spread_over_sessions_and_return_on_disconnect() {
        let mut m = Model::new(100);
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        m.add_session(a);
        m.add_session(b);
        m.add_credits(a, 2);
        m.add_credits(b, 2);
        for set in 0..4 {
            m.push_ready(set, t(1));
        }
        let grants = m.dispatch();
        assert_eq!(grants.iter().filter(|g| g.session == a).count(), 2);
        assert_eq!(grants.iter().filter(|g| g.session == b).count(), 2);
        let mut orphaned = m.remove_session(a);
        orphaned.sort();
        assert_eq!(orphaned.len(), 2);
        assert_eq!(m.ready_len(), 2);
        // A late outcome from the departed session is ignored.
        assert_eq!(m.complete(a, orphaned[0]), None);
        assert_eq!(m.ready_len(), 2);
        m.add_credits(b, 2);
        assert_eq!(m.dispatch().len(), 2);
        assert!(m.dispatch().is_empty());
    }
}
