//! The scheduler's state, as a plain data structure with no I/O so every
//! rule is unit-tested. It holds only what the scheduler alone knows: the
//! worker streams and their credits, the sets granted to each, per-trigger
//! in-flight counts and limits. Which sets are ready is not here: that is
//! `message_sets`, read when there is room to grant.

use std::collections::HashMap;

use uuid::Uuid;

pub type SetId = i64;
pub type TriggerId = Uuid;
pub type StreamId = Uuid;

/// Most credits one stream can hold (sets it holds included): a client
/// that asks for more (a broken or greedy node) is given this many at most.
pub const MAX_STREAM_CREDITS: u32 = 4_096;

/// Sets a new stream may hold at once, whatever credit it asked for. Each
/// outcome it reports for a set it held widens its window by one, up to
/// [`MAX_STREAM_CREDITS`]: a node that finishes work reaches its full
/// credit within its first few hundred outcomes, while a stream that takes
/// sets and never reports (a stuck or greedy peer) keeps at most this many
/// out of everyone else's reach.
pub const INITIAL_WINDOW: u32 = 32;

/// A set granted to a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub stream: StreamId,
    pub set_id: SetId,
    pub trigger_id: TriggerId,
}

#[derive(Debug)]
struct WorkStream {
    credits: u32,
    /// Sets granted to it and not yet reported back.
    held: u32,
    /// Most sets it may hold now (see [`INITIAL_WINDOW`]).
    window: u32,
    /// Grants handed out so far, to spread sets evenly over streams that
    /// are otherwise equal.
    granted: u64,
}

impl Default for WorkStream {
    fn default() -> Self {
        Self { credits: 0, held: 0, window: INITIAL_WINDOW, granted: 0 }
    }
}

impl WorkStream {
    /// How many more sets it may be granted now.
    fn grantable(&self) -> u32 {
        self.credits.min(self.window.saturating_sub(self.held))
    }
}

#[derive(Debug)]
pub struct Model {
    in_flight: HashMap<SetId, (StreamId, TriggerId)>,
    in_flight_per_trigger: HashMap<TriggerId, u32>,
    limits: HashMap<TriggerId, u32>,
    streams: HashMap<StreamId, WorkStream>,
}

impl Default for Model {
    fn default() -> Self {
        Self::new()
    }
}

impl Model {
    pub fn new() -> Self {
        Self {
            in_flight: HashMap::new(),
            in_flight_per_trigger: HashMap::new(),
            limits: HashMap::new(),
            streams: HashMap::new(),
        }
    }

    /// Sets the per-trigger in-flight limit (the trigger's `max_in_flight`;
    /// 0 holds its sets back, for a disabled trigger). Only triggers with a
    /// limit are granted.
    pub fn set_limit(&mut self, trigger: TriggerId, limit: u32) {
        self.limits.insert(trigger, limit);
    }

    /// Forgets a deleted trigger (its sets are gone with it).
    pub fn forget_trigger(&mut self, trigger: TriggerId) {
        self.limits.remove(&trigger);
    }

    pub fn add_stream(&mut self, stream: StreamId) {
        self.streams.entry(stream).or_default();
    }

    /// Removes a stream and forgets its grants. Their claims stay in the
    /// database: the worker releases them as it finishes, or they expire.
    pub fn remove_stream(&mut self, stream: StreamId) -> Vec<SetId> {
        self.streams.remove(&stream);
        let orphaned: Vec<SetId> =
            self.in_flight.iter().filter(|(_, (s, _))| *s == stream).map(|(set, _)| *set).collect();
        for set in &orphaned {
            self.finish(*set);
        }
        orphaned
    }

    /// Adds capacity to a stream, up to [`MAX_STREAM_CREDITS`] (credits of
    /// sets it holds count too).
    pub fn add_credits(&mut self, stream: StreamId, credits: u32) {
        if let Some(s) = self.streams.get_mut(&stream) {
            let cap = MAX_STREAM_CREDITS.saturating_sub(s.held);
            s.credits = s.credits.saturating_add(credits).min(cap);
        }
    }

    /// Sets that may be granted now over all streams: their credits, each
    /// within its window.
    pub fn credits(&self) -> u32 {
        self.streams.values().map(WorkStream::grantable).fold(0, u32::saturating_add)
    }

    /// How many sets of each trigger may be granted now: its limit minus its
    /// sets in flight, and no more than the credits there are.
    pub fn rooms(&self) -> Vec<(TriggerId, u32)> {
        let credits = self.credits();
        if credits == 0 {
            return Vec::new();
        }
        let mut rooms: Vec<(TriggerId, u32)> = self
            .limits
            .iter()
            .filter_map(|(trigger, limit)| {
                let busy = self.in_flight_per_trigger.get(trigger).copied().unwrap_or(0);
                let room = limit.saturating_sub(busy).min(credits);
                (room > 0).then_some((*trigger, room))
            })
            .collect();
        rooms.sort();
        rooms
    }

    /// Hands claimed sets to streams: each to the stream holding the
    /// fewest sets (ties: the most credit left, then the one granted least),
    /// so one stream asking for far more than the others cannot take every
    /// set. Returns the grants and the sets no stream had credit for (to
    /// give back).
    pub fn assign(&mut self, claimed: impl IntoIterator<Item = (SetId, TriggerId)>) -> (Vec<Grant>, Vec<SetId>) {
        let mut grants = Vec::new();
        let mut unassigned = Vec::new();
        for (set_id, trigger) in claimed {
            if self.in_flight.contains_key(&set_id) {
                // Claimed again while we think it is in flight: the old
                // claim expired (its worker died); the new one replaces it.
                self.finish(set_id);
            }
            let Some(stream) = self.best_stream() else {
                unassigned.push(set_id);
                continue;
            };
            let s = self.streams.get_mut(&stream).expect("best stream exists");
            s.credits -= 1;
            s.held += 1;
            s.granted += 1;
            self.in_flight.insert(set_id, (stream, trigger));
            *self.in_flight_per_trigger.entry(trigger).or_default() += 1;
            grants.push(Grant { stream, set_id, trigger_id: trigger });
        }
        (grants, unassigned)
    }

    /// A granted set came back; its worker's capacity returns either way.
    /// Returns the set's trigger if it was in flight for that stream; an
    /// outcome from a stream that no longer holds the set changes nothing
    /// else.
    pub fn complete(&mut self, stream: StreamId, set_id: SetId) -> Option<TriggerId> {
        match self.in_flight.get(&set_id) {
            Some((holder, _)) if *holder == stream => {
                let trigger = self.finish(set_id);
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.window = s.window.saturating_add(1).min(MAX_STREAM_CREDITS);
                }
                self.add_credits(stream, 1);
                trigger
            }
            _ => {
                self.add_credits(stream, 1);
                None
            }
        }
    }

    fn finish(&mut self, set_id: SetId) -> Option<TriggerId> {
        let (holder, trigger) = self.in_flight.remove(&set_id)?;
        if let Some(s) = self.streams.get_mut(&holder) {
            s.held = s.held.saturating_sub(1);
        }
        if let Some(n) = self.in_flight_per_trigger.get_mut(&trigger) {
            *n = n.saturating_sub(1);
        }
        Some(trigger)
    }

    fn best_stream(&self) -> Option<StreamId> {
        use std::cmp::Reverse;
        self.streams
            .iter()
            .filter(|(_, s)| s.grantable() > 0)
            .max_by_key(|(id, s)| (Reverse(s.held), s.grantable(), Reverse(s.granted), **id))
            .map(|(id, _)| *id)
    }

    pub fn in_flight_len(&self) -> usize {
        self.in_flight.len()
    }

    pub fn streams_len(&self) -> usize {
        self.streams.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: u128) -> TriggerId {
        Uuid::from_u128(n)
    }

    #[test]
    fn test_rooms_follow_limits_in_flight_and_credits() {
        let mut m = Model::new();
        m.set_limit(t(1), 3);
        m.set_limit(t(2), 0);
        assert!(m.rooms().is_empty(), "no credits, no room");
        let s = Uuid::from_u128(10);
        m.add_stream(s);
        m.add_credits(s, 2);
        assert_eq!(m.rooms(), [(t(1), 2)], "a zero limit (disabled trigger) gets no room; room <= credits");
        m.add_credits(s, 8);
        assert_eq!(m.rooms(), [(t(1), 3)]);
        let (grants, rest) = m.assign([(1, t(1)), (2, t(1))]);
        assert_eq!(grants.len(), 2);
        assert!(rest.is_empty());
        assert_eq!(m.rooms(), [(t(1), 1)], "in flight counts against the limit");
        assert_eq!(m.complete(s, 1), Some(t(1)));
        assert_eq!(m.rooms(), [(t(1), 2)]);
        m.forget_trigger(t(1));
        assert!(m.rooms().is_empty());
    }

    #[test]
    fn test_grants_need_credits_and_spread_over_streams() {
        let mut m = Model::new();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        m.add_stream(a);
        m.add_stream(b);
        m.add_credits(a, 2);
        m.add_credits(b, 2);
        let (grants, rest) = m.assign((0..5).map(|i| (i, t(1))));
        assert_eq!(grants.iter().filter(|g| g.stream == a).count(), 2);
        assert_eq!(grants.iter().filter(|g| g.stream == b).count(), 2);
        assert_eq!(rest, [4], "no credit left for the fifth");
        assert_eq!(m.credits(), 0);
        let mut orphaned = m.remove_stream(a);
        orphaned.sort();
        assert_eq!(orphaned.len(), 2);
        assert_eq!(m.in_flight_len(), 2);
        // A late outcome from the departed stream is ignored.
        assert_eq!(m.complete(a, orphaned[0]), None);
        assert_eq!(m.credits(), 0, "a departed stream gets no credit back");
        let held: Vec<SetId> = grants.iter().filter(|g| g.stream == b).map(|g| g.set_id).collect();
        assert_eq!(m.complete(b, held[0]), Some(t(1)));
        assert_eq!(m.credits(), 1);
    }

    /// Pins issue #10 item 4: the stream with the most credit got every
    /// grant, so one asking for u32::MAX sets (and never reporting back)
    /// took all of them.
    #[test]
    fn test_a_greedy_stream_cannot_starve_a_node() {
        let mut m = Model::new();
        let (greedy, node) = (Uuid::from_u128(2), Uuid::from_u128(1));
        m.add_stream(greedy);
        m.add_stream(node);
        m.add_credits(greedy, u32::MAX);
        m.add_credits(node, 8);
        assert_eq!(m.credits(), INITIAL_WINDOW + 8, "credit counts within the window");
        // Grants go to whoever holds fewer: the two take turns.
        let (grants, _) = m.assign((0..16).map(|i| (i, t(1))));
        assert_eq!(grants.iter().filter(|g| g.stream == node).count(), 8);
        // The greedy stream never reports: its window stays shut.
        let (more, rest) = m.assign((16..100).map(|i| (i, t(1))));
        assert_eq!(more.len() as u32, INITIAL_WINDOW - 8);
        assert!(more.iter().all(|g| g.stream == greedy));
        assert_eq!(rest.len() as u32, 84 - (INITIAL_WINDOW - 8));
        // The node reports each set and gets the next ones.
        for g in grants.iter().filter(|g| g.stream == node) {
            m.complete(node, g.set_id);
        }
        let (next, _) = m.assign((100..108).map(|i| (i, t(1))));
        assert!(next.iter().all(|g| g.stream == node), "{next:?}");
        // Asking again while holding its window adds nothing it may use.
        m.add_credits(greedy, u32::MAX);
        assert_eq!(m.credits(), 0);
    }

    #[test]
    fn test_the_window_grows_with_outcomes_up_to_the_credit_cap() {
        let mut m = Model::new();
        let s = Uuid::from_u128(1);
        m.add_stream(s);
        m.add_credits(s, u32::MAX);
        assert_eq!(m.credits(), INITIAL_WINDOW);
        for set in 0..i64::from(MAX_STREAM_CREDITS) * 2 {
            let (grants, _) = m.assign([(set, t(1))]);
            for g in grants {
                m.complete(s, g.set_id);
            }
        }
        assert_eq!(m.credits(), MAX_STREAM_CREDITS, "capped, however many outcomes");
    }

    #[test]
    fn test_a_set_claimed_again_replaces_its_expired_grant() {
        let mut m = Model::new();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        m.add_stream(a);
        m.add_credits(a, 1);
        m.assign([(7, t(1))]);
        m.add_stream(b);
        m.add_credits(b, 1);
        let (grants, _) = m.assign([(7, t(1))]);
        assert_eq!(grants[0].stream, b);
        assert_eq!(m.in_flight_len(), 1);
        assert_eq!(m.complete(a, 7), None, "the old holder's outcome changes nothing");
        assert_eq!(m.complete(b, 7), Some(t(1)));
        assert_eq!(m.in_flight_len(), 0);
    }
}
