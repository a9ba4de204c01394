"""bigvis.hlo_text: collectives counted per run of a program, a loop's body its trip count times."""
from bigvis import hlo_text

PROGRAM = """HloModule m

%compare_fusion (i: s32[]) -> pred[] {
  %i = s32[] parameter(0)
  %bound = s32[] constant(2)
  ROOT %lt = pred[] compare(%i, %bound), direction=LT
}

%inner_cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] fusion(%i), kind=kLoop, calls=%compare_fusion
}

%inner_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %a2a = f32[8]{0} all-to-all(%x), dimensions={0}
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %a2a)
}

%wrapped_gather (p: f32[8]) -> f32[32] {
  %p = f32[8]{0} parameter(0)
  ROOT %ag = f32[32]{0} all-gather(%p), dimensions={0}
}

%outer_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ar = bf16[16]{0} all-reduce(%x), to_apply=%add
  %as = ((f32[8]{0}), f32[32]{0}) async-start(%x), calls=%wrapped_gather
  %ad = f32[32]{0} async-done(%as), metadata={op_name="not an all-reduce(%x) but a name"}
  %w = (s32[], f32[8]{0}) while(%p), condition=%inner_cond, body=%inner_body
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %x)
}

ENTRY %main (x: bf16[4,6]) -> bf16[16,6] {
  %x = bf16[4,6]{1,0} parameter(0)
  %ags = (bf16[4,6]{1,0}, bf16[16,6]{1,0}) all-gather-start(%x), dimensions={0}
  %agd = bf16[16,6]{1,0} all-gather-done(%ags)
  %rs = f32[2]{0} reduce-scatter(%y), dimensions={0}, to_apply=%add
  %w = (s32[], f32[8]{0}) while(%t), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = bf16[16,6]{1,0} copy(%agd)
}
"""


def test_collectives_count_results_once_and_loop_bodies_by_their_trip_counts():
  """An asynchronous collective counts once, by its result (the `-done`; the `-start` also holds the
  operand), one in a computation an async wrapper calls as often as its caller runs; a loop's body
  counts XLA's known trip count times (3), a loop inside it the constant its condition's fused
  compare holds (2) times that; an op name that reads like a collective is not one."""
  assert hlo_text.collectives(PROGRAM) == {
      "all-gather": {"ops": 1 + 3, "bytes": 16 * 6 * 2 + 3 * 32 * 4},
      "reduce-scatter": {"ops": 1, "bytes": 2 * 4},
      "all-reduce": {"ops": 3, "bytes": 3 * 16 * 2},
      "all-to-all": {"ops": 6, "bytes": 6 * 8 * 4},
  }
  assert hlo_text.collectives("HloModule m\n\nENTRY %main (x: f32[2]) -> f32[2] {\n  ROOT %x = f32[2]{0} parameter(0)\n}\n") == {}
