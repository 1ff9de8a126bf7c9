"""Planted bugs in what a rule does over steps (fabric_tram/optim/radius.py, ascent_schedule.py): TRAM's radius
and its calibration, the d it takes, the ascent every k steps."""

from __future__ import annotations

from .mutation import Mutation

MUTATIONS = (  # fmt: skip
    Mutation(
        "radius-mean-not-median",
        "TRAM's calibration divides by the mean of d instead of its median (an outlier then sets the scale)",
        (
            (
                "fabric_tram/optim/radius.py",
                "median = torch.nanmedian(self.samples)",
                "median = torch.nanmean(self.samples)",
            ),
        ),
        (
            "tests/test_radius.py::test_calibration_climbs_the_target_then_fixes_the_scale_from_the_median_of_positive_d",
        ),
    ),
    Mutation(
        "radius-state-not-restored",
        "a resumed TRAM run forgets its calibrated scale and the radius it was reusing",
        (
            (
                "fabric_tram/optim/radius.py",
                'self.samples, self.scale, self.last = (on_device(state[k]) for k in ("samples", "scale", "last"))',
                "pass",
            ),
        ),
        ("tests/test_radius.py::test_a_radius_restored_from_its_state_continues_as_the_uninterrupted_one",),
    ),
    Mutation(
        "radius-every-schedule-shifted",
        "radius_every measures d one step late after calibration (the first calibrated step reuses a stale radius)",
        (
            (
                "fabric_tram/optim/radius.py",
                "        return (t - calibrated_after - 1) % every == 0",
                "        return (t - calibrated_after) % every == 0",
            ),
        ),
        ("tests/test_radius.py::test_measurement_schedule_of_radius_every",),
    ),
    Mutation(
        "tram-cap-ignored-after-calibration",
        "TRAM's radius leaves the cap (max_radius, radius_target by default) once calibration has ended",
        (
            (
                "fabric_tram/optim/radius.py",
                "by default)\n        return self.last if self.max_radius is None else "
                "torch.clamp(self.last, max=self.max_radius)",
                "by default)\n        return self.last",
            ),
        ),
        (
            "tests/test_radius.py::test_the_default_cap_is_radius_target_under_auto_and_holds_on_every_step_after_calibration",
            "tests/test_radius.py::test_tram_init_drifting_stays_inside_the_cap_and_the_run_says_it_behaved_as_asam",
        ),
    ),
    Mutation(
        "tram-cap-ignored-while-calibrating",
        "a max_radius below radius_target ignored on the calibration steps",
        (
            (
                "fabric_tram/optim/radius.py",
                "like every other\n            return self.target if self.max_radius is None else "
                "min(self.target, self.max_radius)",
                "like every other\n            return self.target",
            ),
        ),
        ("tests/test_radius.py::test_a_cap_below_radius_target_holds_while_calibrating_too",),
    ),
    Mutation(
        "tram-window-from-step-one",
        "the calibration window opens at step 1 whatever the warm-up (calibration_start ignored)",
        (("fabric_tram/optim/radius.py", "index = step - self.start - 1", "index = step - 1"),),
        ("tests/test_radius.py::test_the_window_opens_after_calibration_start_and_ignores_d_before_it",),
    ),
    Mutation(
        "ascent-phase-counted-from-the-resume",
        "ascent_every's phase counted from the steps this process ran, not from the step (a resume shifts it)",
        (
            (
                "fabric_tram/optim/update_rule.py",
                "        return self.geometry is not None and perturbs(step, self.ascent_every)",
                "        self.seen = getattr(self, 'seen', 0) + 1\n"
                "        return self.geometry is not None and perturbs(self.seen, self.ascent_every)",
            ),
        ),
        ("tests/test_ascent_schedule.py::test_the_ascent_phase_is_a_function_of_the_step_so_a_resumed_run_keeps_it",),
    ),
    Mutation(
        "previous-iterate-stale-between-ascents",
        "tram-prev's previous iterate not stored on the steps between perturbations (ascent_every)",
        (
            (
                "fabric_tram/optim/targets.py",
                "if not (self.is_restore_point and restored):",
                "if not self.is_restore_point:",
            ),
        ),
        (
            "tests/test_ascent_schedule.py::test_tram_prev_between_perturbations_keeps_its_previous_iterate_and_takes_"
            "only_the_d_it_reads[2-1-5-takes_d0]",
        ),
    ),
    Mutation(
        "unread-d-taken-between-ascents",
        "a step between perturbations takes its scheduled d though a later one overwrites it unread (the target "
        "forward paid for nothing)",
        (
            (
                "fabric_tram/optim/radius.py",
                "    if not scheduled(step) or perturbs(step, ascent_every):",
                "    if True:",
            ),
        ),
        (
            "tests/test_ascent_schedule.py::test_tram_prev_between_perturbations_keeps_its_previous_iterate_and_takes_"
            "only_the_d_it_reads[2-1-5-takes_d0]",
        ),
    ),
    Mutation(
        "read-d-skipped-between-ascents",
        "a step between perturbations skips a d that the next perturbing step reads (the radius of an older step)",
        (
            (
                "fabric_tram/optim/radius.py",
                "    return not any(scheduled(t) for t in range(step + 1, "
                "next_perturbing_step(step, ascent_every) + 1))",
                "    return False",
            ),
        ),
        (
            "tests/test_ascent_schedule.py::test_tram_prev_between_perturbations_keeps_its_previous_iterate_and_takes_"
            "only_the_d_it_reads[4-3-13-takes_d1]",
        ),
    ),
)
