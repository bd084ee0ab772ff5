#include "app/sweep.hpp"

#include <chrono>
#include <cmath>

#include <fmt/format.h>

#include "app/tool_info.hpp"
#include "common/errors.hpp"

namespace moe {
namespace {

std::vector<int> divisorsOf(int n) {
  std::vector<int> d;
  for (int i = 1; i <= n; ++i)
    if (n % i == 0) d.push_back(i);
  return d;
}

// One row of the sweep from the run of one layout: the aux-gradient scale furthest from 1 and the
// smallest cosine over the layers, the first failing check and the informational findings.
CheckResult rowOf(const Report& report, double seconds) {
  CheckResult row;
  row.kind = CheckKind::kLayout;
  row.layout = report.context.mesh;
  const MeshSizes& m = report.context.mesh->sizes;
  row.name = fmt::format("dp={} pp={} cp={} M={}", m.dp, m.pp, m.cp, m.microbatches);
  if (m.tp > 1) row.name += fmt::format(" tp={}", m.tp);
  if (m.ep > 1) row.name += fmt::format(" ep={}", m.ep);
  row.ok = report.summary.verdict == Verdict::kPass;
  row.scale = 1.0;
  row.cosine = 1.0;
  for (const CheckResult& c : report.checks) {
    if (c.kind == CheckKind::kAuxGrad) {
      if (std::isnan(c.scale) || std::fabs(c.scale - 1.0) > std::fabs(row.scale - 1.0) || std::isnan(row.scale))
        row.scale = c.scale;
      if (!(c.cosine >= row.cosine)) row.cosine = c.cosine;
    }
    if (c.informational && c.diagnosis.code != DiagnosisCode::kNone) row.findings.push_back(c.diagnosis.code);
    if (!c.informational && !c.ok && row.failing_check.empty()) {
      row.failing_check = c.name;
      row.diagnosis = c.diagnosis;
    }
  }
  row.seconds = seconds;
  return row;
}

}  // namespace

SweepPlan planSweep(const Scenario& base, const SweepOptions& options) {
  if (options.world < 1) throw UsageError("sweep: --world must be >= 1");
  SweepPlan plan;
  for (int tp : divisorsOf(options.world))
    for (int dp : divisorsOf(options.world / tp))
      for (int pp : divisorsOf(options.world / (tp * dp))) {
      const int cp = options.world / (tp * dp * pp);
      std::vector<int> microbatch_counts = {base.mesh.microbatches};
      if (options.all_microbatches && base.data.batch % dp == 0) microbatch_counts = divisorsOf(base.data.batch / dp);
      for (int m : microbatch_counts) {
        Scenario sc = base;
        sc.mesh.tp = tp;
        sc.mesh.dp = dp;
        sc.mesh.pp = pp;
        sc.mesh.cp = cp;
        sc.mesh.microbatches = m;
        if (sc.mesh.schedule != Schedule::kInterleaved1F1B) sc.mesh.virtual_stages = 1;
        try {
          validateScenario(sc);
          plan.layouts.push_back(sc);
        } catch (const InputError&) {
          ++plan.skipped_layouts;  // e.g. layers not divisible by pp, seq_len by cp
        }
      }
    }
  if (plan.layouts.empty())
    throw InputError(base.source_file, "/mesh",
                     fmt::format("no tp x cp x dp x pp layout of world {} is valid for this scenario (batch {}, "
                                 "seq_len {}, layers {})",
                                 options.world, base.data.batch, base.data.seq_len, base.model.layers));
  return plan;
}

Report runSweep(const Scenario& base, const SweepOptions& options, MeshBackend& backend,
                const std::vector<Reporter*>& reporters,
                const std::function<void(int, int, const MeshConfig&)>& progress) {
  const SweepPlan plan = planSweep(base, options);
  Report report;
  report.context.kind = ReportKind::kSweep;
  report.context.tool = toolInfo();
  report.context.scenario = resolveScenario(base);
  report.context.world = options.world;
  for (Reporter* r : reporters) r->reportContext(report.context);
  for (size_t i = 0; i < plan.layouts.size(); ++i) {
    if (progress) progress(static_cast<int>(i), static_cast<int>(plan.layouts.size()), plan.layouts[i].mesh);
    const auto t0 = std::chrono::steady_clock::now();
    const CheckRunOutput out = runChecks(plan.layouts[i], backend, options.run);
    const CheckResult row =
        rowOf(out.report, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    report.checks.push_back(row);
    for (Reporter* r : reporters) r->reportRows({row});
  }
  report.summary.verdict = verdictOf(report.checks);
  report.summary.skipped_layouts = plan.skipped_layouts;
  for (Reporter* r : reporters) r->finalize(report.summary);
  return report;
}

}  // namespace moe
