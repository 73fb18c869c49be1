"""The 20 benchmark triggers: a club's rule set in the rule-file vocabulary (`engine.rulefile`).

A mix of every kind of `when` (stage entered, before/after a membership date at a local time,
visit events, cron schedules), of re-entry scopes (per cycle, ever, per event, every N days) and
of conditions (windowed visit counts, days since the last visit, plan, segment, lifetime value),
with holdouts, variants and fallback channels.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TRIGGERS"]

_HOLDOUT = {"holdout": "10%"}

TRIGGERS: list[dict[str, Any]] = [
    # -- stage entered
    {"id": "welcome", "stage": "onboarding", "when": {"stage_entered": "onboarding"},
     "action": {"channel": "email", "template": "onboarding/welcome", "fallback": ["sms"]},
     "priority": 90, **_HOLDOUT},
    {"id": "renewal-entry", "stage": "renewal_due", "when": {"stage_entered": "renewal_due"},
     "conditions": ['plan != "corporate"'],
     "action": {"channel": "email", "template": "renewal/reminder"},
     "variants": {"plain": {"template": "renewal/reminder"},
                  "progress": {"template": "renewal/reminder_progress"}}, **_HOLDOUT},
    {"id": "goodbye", "stage": "lapsed", "when": {"stage_entered": "lapsed"},
     "conditions": ["lifetime_value > 500"],
     "action": {"channel": "email", "template": "winback/goodbye"}},
    # -- date-relative, after the membership started
    {"id": "first-visit-nudge", "stage": "onboarding",
     "when": {"after": "membership.starts_at", "days": 5, "at": "18:00"},
     "conditions": ["visits_total == 0"],
     "action": {"channel": "sms", "template": "onboarding/first_visit_nudge",
                "fallback": ["email"]}, **_HOLDOUT},
    {"id": "adaptation-week-2", "stage": "onboarding",
     "when": {"after": "membership.starts_at", "days": 14, "at": "10:00"},
     "action": {"channel": "email", "template": "onboarding/adaptation"}, **_HOLDOUT},
    {"id": "adaptation-check-in", "stage": "onboarding",
     "when": {"after": "membership.starts_at", "days": 21, "at": "17:00"},
     "conditions": ["visits_30d < 4"],
     "action": {"channel": "sms", "template": "onboarding/check_in", "fallback": ["email"]},
     **_HOLDOUT},
    {"id": "trial-session", "stage": "active",
     "when": {"after": "membership.starts_at", "days": 60, "at": "12:00"},
     "conditions": ['segment in ["A", "B"]'],
     "action": {"channel": "email", "template": "active/trial_session"}, **_HOLDOUT},
    {"id": "mid-term-check", "stage": "active",
     "when": {"after": "membership.starts_at", "days": 90, "at": "10:00"},
     "conditions": ["days_since_last_visit > 14"],
     "action": {"channel": "chat", "template": "active/check", "fallback": ["email"]}},
    # -- date-relative, before / after the membership ends
    {"id": "renewal-reminder-30d", "stage": "renewal_due",
     "when": {"before": "membership.ends_at", "days": 30, "at": "10:00"},
     "action": {"channel": "email", "template": "renewal/reminder", "fallback": ["sms"]},
     "variants": {"plain": {"template": "renewal/reminder"},
                  "progress": {"template": "renewal/reminder_progress", "weight": 2}},
     **_HOLDOUT},
    {"id": "renewal-reminder-14d", "stage": "renewal_due",
     "when": {"before": "membership.ends_at", "days": 14, "at": "10:00"},
     "conditions": ["visits_30d >= 4", 'plan != "corporate"'],
     "action": {"channel": "email", "template": "renewal/reminder", "fallback": ["sms"]},
     **_HOLDOUT},
    {"id": "renewal-low-usage", "stage": "renewal_due",
     "when": {"before": "membership.ends_at", "days": 21, "at": "09:00"},
     "conditions": ["days_since_last_visit > 14"],
     "action": {"channel": "sms", "template": "renewal/low_usage", "fallback": ["email"]},
     **_HOLDOUT},
    {"id": "renewal-last-call", "stage": "renewal_due",
     "when": {"before": "membership.ends_at", "days": 3, "at": "18:00"},
     "conditions": ["lifetime_value > 500"],
     "action": {"channel": "email", "template": "renewal/last_call", "fallback": ["sms"]},
     "variants": {"mail": {}, "text": {"channel": "sms", "template": "renewal/last_call_sms"}}},
    {"id": "win-back", "stage": "lapsed",
     "when": {"after": "membership.ends_at", "days": 7, "at": "11:00"},
     "action": {"channel": "email", "template": "winback/miss_you", "fallback": ["sms"]},
     **_HOLDOUT},
    {"id": "win-back-offer", "stage": "lapsed",
     "when": {"after": "membership.ends_at", "days": 30, "at": "11:00"},
     "conditions": ['segment in ["A", "B", "C"]'],
     "action": {"channel": "sms", "template": "winback/offer", "fallback": ["email"]},
     **_HOLDOUT},
    # -- visit events
    {"id": "first-visit-congrats", "stage": "onboarding", "when": {"event": "visit"},
     "conditions": ["visits_total == 1"],
     "action": {"channel": "chat", "template": "onboarding/first_visit",
                "fallback": ["sms", "email"]}, **_HOLDOUT},
    {"id": "tenth-visit", "stage": ["onboarding", "active"], "when": {"event": "visit"},
     "conditions": ["visits_total == 10"], "once": "ever",
     "action": {"channel": "email", "template": "active/tenth_visit"}},
    {"id": "streak", "stage": "active", "when": {"event": "visit", "within": "1d"},
     "conditions": ["visits_30d >= 12"], "once": {"every": "30d"},
     "action": {"channel": "chat", "template": "active/streak", "fallback": ["email"]}},
    # -- schedules in the customer's local time
    {"id": "we-miss-you", "stage": "active", "when": {"schedule": "0 11 * * mon"},
     "conditions": ["days_since_last_visit > 14"], "once": {"every": "30d"},
     "action": {"channel": "chat", "template": "active/we_miss_you", "fallback": ["email"]},
     **_HOLDOUT},
    {"id": "event-invitation", "stage": "active", "when": {"schedule": "0 17 * * mon"},
     "conditions": ["visits_30d >= 6"], "once": {"every": "28d"},
     "action": {"channel": "email", "template": "active/event_invitation"}, **_HOLDOUT},
    {"id": "reengage-10d", "stage": ["active", "renewal_due"],
     "when": {"schedule": "0 9 * * *"}, "once": "per_event",
     "conditions": ["days_since_last_visit == 10", 'segment != "D"'],
     "action": {"channel": "sms", "template": "active/reengage", "fallback": ["chat", "email"]}},
]
