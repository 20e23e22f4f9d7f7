"""The active-passive election: rules one by one, then a simulated group of 2-3 nodes with a
model store (lease expiry, revisions, a watch that lags), the kernel's address lifetimes and
the VIP guard, under random heartbeat loss, link cuts (isolation by the ARP monitor's
rule), store cuts, freezes with and without the guard, kills and health flaps: with
fencing, never two owners at one instant, and nobody claims without holding the key."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.vip.election import (
    KERNEL_EXPIRY_LATENESS_S,
    MIN_LEASE_MARGIN_S,
    Action,
    Decision,
    Election,
    ElectionConfig,
    FenceView,
    PeerReport,
    Reason,
    address_lifetime,
)
from edge.vip.track import ReachTrack

TICK = 0.1


def election(node_id: str = "a", priority: int = 100, **kw: object) -> Election:
    return Election(ElectionConfig(node_id=node_id, priority=priority, **kw))  # type: ignore[arg-type]


def run_until(e: Election, start: float, end: float, *, healthy: bool = True) -> float:
    now = start
    while now < end:
        e.step(now, healthy)
        now = round(now + TICK, 6)
    return now


def peer(node_id: str, priority: int, *, active: bool = False, eligible: bool = True) -> PeerReport:
    return PeerReport(node_id=node_id, priority=priority, eligible=eligible, active=active)


def test_listens_one_dead_interval_then_claims_alone() -> None:
    e = election()
    first = e.step(0.0, True)
    assert (first.action, first.reason) == (Action.STANDBY, Reason.LISTENING)
    assert not first.want_key
    e.step(0.1, True)
    e.step(0.2, True)
    claim = e.step(0.31, True)
    assert (claim.action, claim.reason) == (Action.CLAIM, Reason.ELECTED)
    assert claim.lifetime_s == 1 and e.term == 1
    keep = e.step(0.41, True)
    assert (keep.action, keep.reason) == (Action.KEEP, Reason.ACTIVE)


def test_an_unhealthy_node_never_claims_even_alone() -> None:
    e = election()
    now = 0.0
    for _ in range(50):
        d = e.step(now, False)
        assert (d.action, d.reason) == (Action.STANDBY, Reason.UNHEALTHY)
        assert not d.want_key
        now += TICK


def test_owner_that_turns_unhealthy_releases() -> None:
    e = election()
    now = run_until(e, 0.0, 0.5)
    assert e.owning
    d = e.step(now, False)
    assert (d.action, d.reason) == (Action.RELEASE, Reason.UNHEALTHY)


def test_higher_priority_peer_wins_and_lower_stands_by() -> None:
    e = election("a", 100)
    now = 0.0
    for _ in range(10):
        e.heard(peer("b", 200), now)
        d = e.step(now, True)
        now += TICK
    assert (d.action, d.reason) == (Action.STANDBY, Reason.PEER_OUTRANKS)


def test_peer_dead_after_n_missed_heartbeats() -> None:
    e = election("a", 100)
    for t in (0.0, 0.1, 0.2):
        assert e.step(t, True).reason is Reason.LISTENING
    e.heard(peer("b", 200, active=True), 0.05)
    assert e.step(0.34, True).reason is Reason.PEER_ACTIVE  # heard 0.29 s ago: still live
    d = e.step(0.36, True)  # three intervals missed
    assert (d.action, d.reason) == (Action.CLAIM, Reason.ELECTED)


def test_ties_break_on_node_id_the_same_way_on_both_sides() -> None:
    a, b = election("a", 100), election("b", 100)
    now = 0.0
    for _ in range(10):
        a.heard(PeerReport("b", 100, b.eligible, b.owning), now)
        b.heard(PeerReport("a", 100, a.eligible, a.owning), now)
        a.step(now, True)
        b.step(now, True)
        now += TICK
    assert b.owning and not a.owning


def test_without_preemption_a_returning_higher_node_does_not_take_over() -> None:
    low = election("a", 100, preempt=False)
    now = run_until(low, 0.0, 0.5)
    assert low.owning
    for _ in range(30):
        low.heard(peer("b", 200), now)
        d = low.step(now, True)
        now += TICK
    assert (d.action, d.reason) == (Action.KEEP, Reason.ACTIVE)
    # and the higher node, seeing an active peer, stands by
    high = election("b", 200, preempt=False)
    for _ in range(10):
        high.heard(peer("a", 100, active=True), now)
        d = high.step(now, True)
        now += TICK
    assert (d.action, d.reason) == (Action.STANDBY, Reason.PEER_ACTIVE)


def test_preemption_waits_for_the_delay_then_yields() -> None:
    low = election("a", 100, preempt=True, preempt_delay_s=1.0)
    now = run_until(low, 0.0, 0.5)
    first_heard = now
    actions = []
    while now < first_heard + 1.5:
        low.heard(peer("b", 200), now)
        actions.append((round(now - first_heard, 2), low.step(now, True)))
        now = round(now + TICK, 6)
    yielded = [t for t, d in actions if d.action is Action.RELEASE]
    assert yielded and yielded[0] >= 1.0
    assert actions[-1][1].reason is Reason.PEER_OUTRANKS  # stays down, waits for b's claim


def test_two_claimants_the_lower_releases_and_the_higher_reannounces() -> None:
    low, high = election("a", 100), election("b", 200)
    now = run_until(low, 0.0, 0.5)
    run_until(high, 0.0, 0.5)
    assert low.owning and high.owning  # a healed partition
    low.heard(peer("b", 200, active=True), now)
    high.heard(peer("a", 100, active=True), now)
    assert low.step(now, True).reason is Reason.PEER_OUTRANKS
    d = high.step(now, True)
    assert (d.action, d.reason) == (Action.REANNOUNCE, Reason.LOWER_PEER_CLAIMING)


def test_owner_announces_again_when_a_peer_comes_back() -> None:
    e = election("b", 200)
    now = run_until(e, 0.0, 0.5)
    e.heard(peer("a", 100), now)
    d = e.step(now, True)
    assert (d.action, d.reason) == (Action.REANNOUNCE, Reason.PEER_RETURNED)
    e.heard(peer("a", 100), now + 0.1)
    assert e.step(now + 0.1, True).action is Action.KEEP  # still live: nothing new
    now = run_until(e, now + 0.2, now + 1.0)  # a is dead by now
    e.heard(peer("a", 100), now)
    assert e.step(now, True).reason is Reason.PEER_RETURNED


def test_a_pause_longer_than_the_dead_interval_releases_and_listens_again() -> None:
    e = election()
    now = run_until(e, 0.0, 0.5)
    assert e.owning
    d = e.step(now + 5.0, True)
    assert (d.action, d.reason) == (Action.RELEASE, Reason.WOKE)
    assert e.step(now + 5.1, True).reason is Reason.LISTENING


def test_fenced_claims_only_with_the_key_and_releases_before_the_lease_ends() -> None:
    e = election(fenced=True)
    now = run_until(e, 0.0, 0.4)
    e.fence_changed(FenceView(reachable=True))
    d = e.step(now, True)
    assert (d.action, d.reason, d.want_key) == (Action.STANDBY, Reason.WAITING_FOR_KEY, True)
    e.fence_changed(FenceView(reachable=True, holds=True, token=7, lease_deadline=now + 2.0))
    d = e.step(now, True)
    assert d.action is Action.CLAIM and d.lifetime_s == 1
    # the store goes away: keep while the lease is surely alive, release before margin
    e.fence_changed(FenceView(reachable=False, holds=True, token=7, lease_deadline=now + 2.0))
    last_keep = now
    while (d := e.step(now, True)).action is Action.KEEP:
        last_keep = now
        now = round(now + 0.05, 6)
    assert (d.action, d.reason) == (Action.RELEASE, Reason.LEASE_EXPIRING)
    assert last_keep + MIN_LEASE_MARGIN_S <= e.fence.lease_deadline < now + MIN_LEASE_MARGIN_S


def test_fenced_node_cut_from_the_store_is_not_eligible() -> None:
    e = election(fenced=True)
    now = run_until(e, 0.0, 0.5)
    d = e.step(now, True)
    assert (d.reason, e.eligible) == (Reason.STORE_UNREACHABLE, False)


def test_address_lifetime_ends_before_the_lease_can() -> None:
    for remaining in (0.5, 1.0, 1.34, 1.36, 1.9, 2.0, 2.99, 3.0, 10.0):
        fence = FenceView(reachable=True, holds=True, lease_deadline=100.0 + remaining)
        lifetime = address_lifetime(fence, 100.0)
        assert 100.0 + lifetime + KERNEL_EXPIRY_LATENESS_S <= fence.lease_deadline
    assert address_lifetime(FenceView(reachable=True), 0.0) == 0


def test_a_packet_with_our_own_id_is_never_a_peer() -> None:
    e = election("a", 100)
    e.heard(peer("a", 250, active=True), 0.0)
    assert not e.peers


# -- rule 7: a claim the store contradicts ----------------------------------------------


def fenced_standby(now: float = 0.0) -> tuple[Election, float]:
    """b (priority 100, fenced) past its listening interval, the store reachable."""
    e = election("b", 100, fenced=True)
    e.fence_changed(FenceView(reachable=True, seen_revision=5, key_token=5))
    return e, run_until(e, now, now + 0.4)


def active_a(token: int = 5) -> PeerReport:
    return PeerReport("a", 200, eligible=True, active=True, term=1, token=token)


def test_a_claim_whose_key_the_store_shows_gone_is_void_and_the_standby_asks_at_once() -> None:
    e, now = fenced_standby()
    e.heard(active_a(5), now)
    assert e.step(now, True).reason is Reason.PEER_ACTIVE
    # a's guard revoked its lease: the watch saw the delete (revision 6), a's heartbeat
    # (heard 10 ms ago, live for another 290 ms) is not waited out
    e.fence_changed(FenceView(reachable=True, seen_revision=6, key_token=0))
    d = e.step(now + 0.01, True)
    assert (d.action, d.reason, d.want_key) == (Action.STANDBY, Reason.WAITING_FOR_KEY, True)
    # it claims only once it holds the key
    e.fence_changed(
        FenceView(True, True, token=7, lease_deadline=now + 2, seen_revision=7, key_token=7)
    )
    assert e.step(now + 0.02, True).action is Action.CLAIM


def test_a_claim_held_by_another_token_is_void_too() -> None:
    e, now = fenced_standby()
    e.heard(active_a(5), now)
    e.fence_changed(FenceView(reachable=True, seen_revision=9, key_token=8))  # c holds it
    assert e.step(now, True).reason is Reason.WAITING_FOR_KEY


def test_an_older_observation_never_voids_a_newer_claim() -> None:
    e, now = fenced_standby()
    # the store was seen free at revision 6, a acquired at 7 since: its claim stands
    e.fence_changed(FenceView(reachable=True, seen_revision=6, key_token=0))
    e.heard(active_a(7), now)
    assert e.step(now, True).reason is Reason.PEER_ACTIVE
    # seen with the key a holds: still a claim
    e.fence_changed(FenceView(reachable=True, seen_revision=12, key_token=7))
    assert e.step(now + 0.01, True).reason is Reason.PEER_ACTIVE


def test_an_owner_does_not_yield_to_a_stale_claim_of_a_higher_peer() -> None:
    e, now = fenced_standby()
    e.fence_changed(
        FenceView(True, True, token=7, lease_deadline=now + 2, seen_revision=7, key_token=7)
    )
    assert e.step(now, True).action is Action.CLAIM
    e.heard(active_a(5), now + 0.01)  # a's last word before it noticed it lost the key
    d = e.step(now + 0.02, True)
    assert d.owning and d.reason is not Reason.PEER_OUTRANKS


def test_unfenced_nothing_is_void() -> None:
    e = election("b", 100)
    now = run_until(e, 0.0, 0.4)
    e.heard(active_a(5), now)
    assert e.step(now, True).reason is Reason.PEER_ACTIVE


# -- rule 8: isolated ----------------------------------------------------------------


def test_an_isolated_owner_releases_and_is_not_eligible() -> None:
    e = election()
    now = run_until(e, 0.0, 0.5)
    assert e.owning
    d = e.step(now, True, isolated=True)
    assert (d.action, d.reason, d.want_key, e.eligible) == (
        Action.RELEASE,
        Reason.ISOLATED,
        False,
        False,
    )
    assert e.step(now + 0.1, True, isolated=True).action is Action.STANDBY
    assert e.step(now + 0.2, True).action is Action.CLAIM


# -- a simulated group: nodes, a model store, the kernel's lifetimes, the guard ----------

TTL = 2.0
GUARD_BOUND = 0.3
WATCH_LAGS = (0.0, 0.0, 0.05, 0.3)  # how old the store state a node last saw can be


@dataclass
class Store:
    holder: str | None = None
    expiry: float = 0.0
    revision: int = 0
    token: int = 0  # the key's mod revision (0: no key)
    history: list[tuple[float, int, int]] = field(default_factory=lambda: [(0.0, 0, 0)])

    def sweep(self, now: float) -> None:
        """etcd expires the lease (and deletes the key) once its TTL has run out."""
        if self.holder is not None and now >= self.expiry:
            self._delete(self.expiry)

    def _delete(self, at: float) -> None:
        self.holder, self.token = None, 0
        self.revision += 1
        self.history.append((at, self.revision, 0))

    def acquire(self, who: str, now: float) -> int:
        self.revision += 1
        self.holder, self.expiry, self.token = who, now + TTL, self.revision
        self.history.append((now, self.revision, self.token))
        return self.token

    def release(self, who: str, now: float) -> None:
        if self.holder == who:
            self._delete(now)

    def seen(self, at: float) -> tuple[int, int]:
        """(revision, key token) as they were at `at` (what a lagging watch shows)."""
        revision, token = 0, 0
        for t, r, k in self.history:
            if t > at:
                break
            revision, token = r, k
        return revision, token


@dataclass
class SimNode:
    election: Election
    frozen: bool = False
    dead: bool = False
    guard_at: float | None = None  # frozen alone (not its guard): when the guard fires
    guard_fired: bool = False
    store_cut: bool = False
    healthy: bool = True
    vip_expiry: float = 0.0  # the kernel's view: the address exists while now < this
    fence: FenceView = field(default_factory=lambda: FenceView(reachable=False))
    track: ReachTrack = field(default_factory=lambda: ReachTrack(missed=2, interval_s=TICK))

    @property
    def asleep(self) -> bool:
        return self.frozen or self.dead


FAULTS = ("freeze", "freeze_agent", "kill", "store_cut", "link_cut", "sick", "heal_all")


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[int], list[tuple[int, str, int]], int, float]:
    count = draw(st.integers(2, 3))
    priorities = draw(st.lists(st.integers(1, 3), min_size=count, max_size=count))
    faults = draw(
        st.lists(
            st.tuples(st.integers(0, 150), st.sampled_from(FAULTS), st.integers(0, count - 1)),
            max_size=12,
        )
    )
    seed = draw(st.integers(0, 2**16))
    loss = draw(st.sampled_from([0.0, 0.1, 0.5]))
    return priorities, sorted(faults), seed, loss


def fresh(node_id: str, priority: int, fenced: bool, kind: type[Election] = Election) -> Election:
    return kind(ElectionConfig(node_id=node_id, priority=priority, fenced=fenced))


def guard_fires(node: SimNode, store: Store, now: float) -> None:
    """The VIP guard: the address goes first, then the lease (when the store answers)."""
    node.vip_expiry = min(node.vip_expiry, now)
    if not node.store_cut:
        store.release(node.election.config.node_id, now)
    node.guard_at, node.guard_fired = None, True


def simulate(
    priorities: list[int],
    faults: list[tuple[int, str, int]],
    seed: int,
    loss: float,
    fenced: bool,
    kinds: list[type[Election]] | None = None,
) -> tuple[list[SimNode], int, list[int]]:
    import random

    rng = random.Random(seed)
    kinds = kinds or [Election] * len(priorities)
    nodes = [SimNode(fresh(f"n{i}", p, fenced, kinds[i])) for i, p in enumerate(priorities)]
    store = Store()
    cut_links: set[int] = set()
    owners_over_time: list[int] = []
    max_owners = 0
    pending = list(faults)
    ticks = 220  # faults stop at 150: 7 s after the last one for the group to settle

    def revive(node: SimNode) -> None:
        e = node.election
        node.election = fresh(e.config.node_id, e.config.priority, fenced, type(e))
        node.dead, node.fence = False, FenceView(reachable=False)

    def wake(node: SimNode, now: float) -> None:
        node.frozen, node.guard_at = False, None
        if node.guard_fired:
            node.guard_fired = False
            node.election.guard_fired(now)
            node.fence = FenceView(reachable=not node.store_cut)

    def heal(now: float) -> None:
        for n in nodes:
            wake(n, now)
            if n.dead:
                revive(n)
            n.store_cut = False
            n.healthy = True
        cut_links.clear()

    for tick in range(ticks):
        at = tick * TICK
        while pending and pending[0][0] == tick:
            _, fault, i = pending.pop(0)
            node = nodes[i]
            if fault == "freeze":
                if node.frozen:
                    wake(node, at)
                else:
                    node.frozen = True  # with its guard: nothing of the node runs
            elif fault == "freeze_agent":
                if node.frozen:
                    wake(node, at)
                else:
                    node.frozen, node.guard_at = True, at + GUARD_BOUND
            elif fault == "kill":
                if node.dead:
                    revive(node)
                else:
                    node.dead = True
                    node.frozen, node.guard_at = False, None
                    guard_fires(node, store, at)  # the pipe closed
            elif fault == "store_cut":
                node.store_cut = not node.store_cut
            elif fault == "link_cut":
                cut_links.symmetric_difference_update({i})
            elif fault == "sick":
                node.healthy = not node.healthy
            else:
                heal(at)
        if tick == 150:  # everything heals for the settle phase
            heal(at)
        # each node steps once per tick, at a jittered instant, in time order
        times = sorted((at + rng.uniform(0, 0.03), i) for i in range(len(nodes)))
        for now, i in times:
            store.sweep(now)
            for n in nodes:
                if n.guard_at is not None and now >= n.guard_at:
                    guard_fires(n, store, now)
            node = nodes[i]
            if node.asleep:
                continue
            e = node.election
            # the ARP monitor: a round per step, the targets answer unless the link is cut
            if i not in cut_links:
                node.track.answered()
            node.track.new_round()
            isolated = node.track.isolated(now, e.last_peer_heard())
            if fenced:
                node.fence = renew(node, store, now, rng)
                e.fence_changed(node.fence)
            d = e.step(now, node.healthy, isolated)
            if fenced and d.action is Action.CLAIM and type(e) is Election:
                # a standby claims only holding the key
                assert store.holder == e.config.node_id and now < store.expiry
            if d.owning:
                assert d.lifetime_s is not None and d.lifetime_s >= 1
                node.vip_expiry = now + d.lifetime_s + KERNEL_EXPIRY_LATENESS_S
            else:
                node.vip_expiry = min(node.vip_expiry, now)
            if fenced and not d.want_key and node.fence.holds and not node.store_cut:
                store.release(e.config.node_id, now)
                node.fence = FenceView(reachable=True)
                e.fence_changed(node.fence)
            token = node.fence.token if node.fence.holds else 0
            report = PeerReport(
                e.config.node_id, e.config.priority, e.eligible, e.owning, e.term, token
            )
            for j, other in enumerate(nodes):
                if j == i or other.asleep or i in cut_links or j in cut_links:
                    continue
                if rng.random() < loss:
                    continue
                other.election.heard(report, now)
            # the invariant, checked at every instant something can change
            owners = sum(1 for n in nodes if n.vip_expiry > now)
            max_owners = max(max_owners, owners)
        owners_over_time.append(sum(1 for n in nodes if n.vip_expiry > at + 0.05))
    return nodes, max_owners, owners_over_time


def renew(node: SimNode, store: Store, now: float, rng: object) -> FenceView:
    """The fencing driver against the model store: renew when held, acquire when wanted;
    what it shows of the key lags (a watch, a poll) but never goes back."""
    import random

    assert isinstance(rng, random.Random)
    me = node.election.config.node_id
    old = node.fence
    if node.store_cut:
        return (
            old
            if not old.reachable
            else FenceView(
                False, old.holds, old.token, old.lease_deadline, old.seen_revision, old.key_token
            )
        )
    revision, key = store.seen(now - rng.choice(WATCH_LAGS))
    if revision < old.seen_revision:
        revision, key = old.seen_revision, old.key_token
    if store.holder == me and now < store.expiry and old.holds and old.token == store.token:
        store.expiry = now + TTL
        return FenceView(True, True, old.token, now + TTL, store.revision, store.token)
    wants = node.election.last_decision is not None and node.election.last_decision.want_key
    if wants and store.holder is None:
        token = store.acquire(me, now)
        return FenceView(True, True, token, now + TTL, token, token)
    return FenceView(True, seen_revision=revision, key_token=key)


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_fenced_group_never_has_two_owners(
    scenario: tuple[list[int], list[tuple[int, str, int]], int, float],
) -> None:
    priorities, faults, seed, loss = scenario
    _nodes, max_owners, owners = simulate(priorities, faults, seed, loss, fenced=True)
    assert max_owners <= 1
    if loss < 0.5:  # liveness once everything healed: someone owns it
        assert owners[-1] == 1


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_unfenced_group_settles_on_the_best_node_once_healed(
    scenario: tuple[list[int], list[tuple[int, str, int]], int, float],
) -> None:
    priorities, faults, seed, _loss = scenario
    nodes, _max, owners = simulate(priorities, faults, seed, 0.0, fenced=False)
    assert owners[-1] == 1
    best = max(nodes, key=lambda n: (n.election.config.priority, n.election.config.node_id))
    assert best.election.owning


class ClaimsOnSight(Election):
    """A wrong election: a standby that asks for the key claims at once, without it."""

    def _decide(self, now: float, healthy: bool, isolated: bool) -> Decision:
        d = super()._decide(now, healthy, isolated)
        if d.reason is Reason.WAITING_FOR_KEY:
            return Decision(Action.CLAIM, Reason.ELECTED, True, 1)
        return d


def test_the_simulation_can_fail() -> None:
    """The model finds two owners when a standby claims without holding the key: the
    active frozen with its guard (its address lives on, its lease runs)."""
    kinds: list[type[Election]] = [Election, ClaimsOnSight]
    _nodes, max_owners, _ = simulate([2, 1], [(30, "freeze", 0)], 1, 0.0, True, kinds)
    assert max_owners == 2
    _nodes, max_owners, _ = simulate([2, 1], [(30, "freeze", 0)], 1, 0.0, True)
    assert max_owners == 1
