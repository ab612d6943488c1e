#include "worker/quantize/placement.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

#include "worker/quantize/cka.h"

namespace spear::quantize {

absl::StatusOr<std::vector<EcPlacement>> PlanEcPlacement(const std::vector<double>& damages,
                                                         const std::vector<ModuleEcCost>& costs,
                                                         double budget_bytes,
                                                         std::vector<int64_t> rank_options,
                                                         const PlacementOptions& opt) {
  if (damages.size() != costs.size()) {
    return absl::InvalidArgumentError("PlanEcPlacement: damages and costs differ in length");
  }
  if (!(budget_bytes >= 0.0) || !(opt.breadth > 0.0) || !(opt.latency_weight >= 0.0) ||
      opt.max_launches < -1) {
    return absl::InvalidArgumentError(
        "PlanEcPlacement: budget >= 0, breadth > 0, latency_weight >= 0, max_launches >= -1");
  }
  std::sort(rank_options.begin(), rank_options.end());
  rank_options.erase(std::unique(rank_options.begin(), rank_options.end()), rank_options.end());
  if (rank_options.empty() || rank_options.front() <= 0) {
    return absl::InvalidArgumentError("PlanEcPlacement: rank options must be positive");
  }
  for (const ModuleEcCost& c : costs) {
    if (!(c.bytes_per_rank > 0.0) || !(c.fixed_bytes >= 0.0) || !(c.relative_latency >= 0.0) ||
        c.launch_group < -1 ||
        !std::isfinite(c.bytes_per_rank + c.fixed_bytes + c.relative_latency)) {
      return absl::InvalidArgumentError("PlanEcPlacement: bad module cost");
    }
  }
  auto ent = ComputeDamageEntropy(damages);
  if (!ent.ok()) return ent.status();
  const int64_t n = static_cast<int64_t>(damages.size());
  const int64_t positive = std::count_if(damages.begin(), damages.end(), [](double d) { return d > 0; });
  const int64_t cap = std::min<int64_t>(
      positive, std::max<int64_t>(1, static_cast<int64_t>(std::floor(opt.breadth * ent->effective_modules + 0.5))));

  // 2. Selection at the smallest rank: the best remaining module each time
  // (a strict maximum over ascending indices: ties go to the lower index).
  // A module's launch: its group, or itself (-1 - i: apart from every group id).
  std::set<int64_t> launches;  // launches that already carry an EC
  const auto launch_of = [&](int64_t i) {
    const int64_t g = costs[static_cast<size_t>(i)].launch_group;
    return g >= 0 ? g : -1 - i;
  };
  const auto launch_allowed = [&](int64_t i) {
    return opt.max_launches < 0 || launches.count(launch_of(i)) > 0 ||
           static_cast<int64_t>(launches.size()) < opt.max_launches;
  };
  auto key = [&](int64_t i) {
    const ModuleEcCost& c = costs[static_cast<size_t>(i)];
    const bool paid = launches.count(launch_of(i)) > 0;  // an untaken module alone: never
    return damages[static_cast<size_t>(i)] /
           (c.Bytes(rank_options.front()) *
            (1.0 + opt.latency_weight * (paid ? 0.0 : c.relative_latency)));
  };
  std::vector<int64_t> level(static_cast<size_t>(n), -1);  // index into rank_options
  std::vector<char> seen(static_cast<size_t>(n), 0);       // taken or skipped
  double used = 0.0;
  int64_t taken = 0;
  while (taken < cap) {
    int64_t i = -1;
    double best_key = -1.0;
    for (int64_t j = 0; j < n; ++j) {
      if (seen[static_cast<size_t>(j)] || damages[static_cast<size_t>(j)] <= 0.0) continue;
      if (!launch_allowed(j)) continue;  // the cap only grows tighter: never eligible again
      const double k = key(j);
      if (k > best_key) {
        best_key = k;
        i = j;
      }
    }
    if (i < 0) break;
    seen[static_cast<size_t>(i)] = 1;
    const double b = costs[static_cast<size_t>(i)].Bytes(rank_options.front());
    if (used + b > budget_bytes) continue;
    used += b;
    level[static_cast<size_t>(i)] = 0;
    ++taken;
    launches.insert(launch_of(i));
  }
  const auto bytes_at = [&](int64_t i, int64_t lv) {
    return costs[static_cast<size_t>(i)].Bytes(rank_options[static_cast<size_t>(lv)]);
  };
  // 3. Proportional shares, biggest damage first.
  std::vector<int64_t> sel;
  double dsum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (level[static_cast<size_t>(i)] >= 0) {
      sel.push_back(i);
      dsum += damages[static_cast<size_t>(i)];
    }
  }
  std::stable_sort(sel.begin(), sel.end(), [&](int64_t a, int64_t b) {
    return damages[static_cast<size_t>(a)] > damages[static_cast<size_t>(b)];
  });
  const int64_t nlv = static_cast<int64_t>(rank_options.size());
  for (int64_t i : sel) {
    const double share = budget_bytes * damages[static_cast<size_t>(i)] / dsum;
    int64_t target = 0;
    while (target + 1 < nlv && bytes_at(i, target + 1) <= share) ++target;
    const int64_t cur = level[static_cast<size_t>(i)];
    if (target > cur && used - bytes_at(i, cur) + bytes_at(i, target) <= budget_bytes) {
      used += bytes_at(i, target) - bytes_at(i, cur);
      level[static_cast<size_t>(i)] = target;
    }
  }
  // 4. Spend the leftover one step at a time on the most under-served module.
  while (true) {
    int64_t best = -1;
    double best_key = -1.0;
    for (int64_t i : sel) {
      const int64_t cur = level[static_cast<size_t>(i)];
      if (cur + 1 >= nlv || used - bytes_at(i, cur) + bytes_at(i, cur + 1) > budget_bytes) continue;
      const double k = damages[static_cast<size_t>(i)] / bytes_at(i, cur);
      if (k > best_key) {
        best_key = k;
        best = i;
      }
    }
    if (best < 0) break;
    const int64_t cur = level[static_cast<size_t>(best)];
    used += bytes_at(best, cur + 1) - bytes_at(best, cur);
    level[static_cast<size_t>(best)] = cur + 1;
  }
  std::vector<EcPlacement> plan;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t lv = level[static_cast<size_t>(i)];
    if (lv >= 0) plan.push_back({i, rank_options[static_cast<size_t>(lv)], bytes_at(i, lv)});
  }
  return plan;
}

}  // namespace spear::quantize
