// Hierarchical path decomposition on the CPU: threads own disjoint (input, target) pairs;
// each keeps a scratch row per layer to sum the effective weights of the candidates.
#include "pyengine/core/paths.h"

#include "pyengine/core/parallel.h"
#include "pyengine/core/paths_connect.h"

#include <algorithm>
#include <limits>
#include <vector>

namespace pyengine::core {
namespace {

struct Candidate {
  double score;
  std::int64_t parent;
  std::int64_t unit;
};

bool better(const Candidate& a, const Candidate& b) {
  if (a.score != b.score) return a.score > b.score;
  if (a.parent != b.parent) return a.parent < b.parent;
  return a.unit < b.unit;
}

// Sums the effective weight of every unit of `in` feeding pooled unit q with weight w.
class Scratch {
 public:
  void reset(std::int64_t size) {
    if (static_cast<std::int64_t>(weight_.size()) < size) {
      weight_.assign(static_cast<std::size_t>(size), 0.0);
      seen_.assign(static_cast<std::size_t>(size), 0);
    }
    for (std::int64_t j : touched_) {
      weight_[static_cast<std::size_t>(j)] = 0.0;
      seen_[static_cast<std::size_t>(j)] = 0;
    }
    touched_.clear();
  }

  void add(std::int64_t j, double w) {
    if (!seen_[static_cast<std::size_t>(j)]) {
      seen_[static_cast<std::size_t>(j)] = 1;
      touched_.push_back(j);
    }
    weight_[static_cast<std::size_t>(j)] += w;
  }

  const std::vector<std::int64_t>& touched() const { return touched_; }
  double weight(std::int64_t j) const { return weight_[static_cast<std::size_t>(j)]; }

 private:
  std::vector<double> weight_;
  std::vector<unsigned char> seen_;
  std::vector<std::int64_t> touched_;
};

void walk(const PathStep* steps, std::int64_t layers, const double* const* activations, std::int64_t b,
          std::int64_t target, std::int64_t beam, std::int64_t* paths, double* scores, Scratch& scratch) {
  // Beam entries: score, the unit each path has reached, and its units so far (top layer first).
  std::vector<double> score{0.0};
  std::vector<std::int64_t> reached{target};
  std::vector<std::vector<std::int64_t>> units{{}};
  std::vector<Candidate> candidates;
  for (std::int64_t l = layers - 1; l >= 0; --l) {
    const PathStep& s = steps[l];
    const double* a = activations[l] + b * s.in.size();
    candidates.clear();
    for (std::int64_t p = 0; p < static_cast<std::int64_t>(reached.size()); ++p) {
      scratch.reset(s.in.size());
      connect(s, b, reached[static_cast<std::size_t>(p)], scratch);
      for (std::int64_t j : scratch.touched()) {
        candidates.push_back({score[static_cast<std::size_t>(p)] + scratch.weight(j) * a[j], p, j});
      }
    }
    const std::int64_t keep = std::min<std::int64_t>(beam, static_cast<std::int64_t>(candidates.size()));
    std::partial_sort(candidates.begin(), candidates.begin() + keep, candidates.end(), better);
    std::vector<double> next_score;
    std::vector<std::int64_t> next_reached;
    std::vector<std::vector<std::int64_t>> next_units;
    for (std::int64_t k = 0; k < keep; ++k) {
      const Candidate& c = candidates[static_cast<std::size_t>(k)];
      next_score.push_back(c.score);
      next_reached.push_back(c.unit);
      next_units.push_back(units[static_cast<std::size_t>(c.parent)]);
      next_units.back().push_back(c.unit);
    }
    score.swap(next_score);
    reached.swap(next_reached);
    units.swap(next_units);
  }
  for (std::int64_t k = 0; k < beam; ++k) {
    const bool found = k < static_cast<std::int64_t>(units.size());
    scores[k] = found ? score[static_cast<std::size_t>(k)] : -std::numeric_limits<double>::infinity();
    for (std::int64_t l = 0; l < layers; ++l) {  // stored in forward order
      paths[k * layers + l] = found ? units[static_cast<std::size_t>(k)][static_cast<std::size_t>(layers - 1 - l)] : -1;
    }
  }
}

}  // namespace

void hierarchical_paths(const PathStep* steps, std::int64_t layers, const double* const* activations,
                        std::int64_t batch, const std::int64_t* targets, std::int64_t per_input, std::int64_t beam,
                        std::int64_t* paths, double* scores, int num_threads) {
  const std::int64_t pairs = batch * per_input;
  if (pairs == 0 || layers == 0 || beam <= 0) return;
  parallel_for(0, pairs, 1, [&](std::int64_t begin, std::int64_t end) {
    Scratch scratch;
    for (std::int64_t pair = begin; pair < end; ++pair) {
      walk(steps, layers, activations, pair / per_input, targets[pair], beam, paths + pair * beam * layers,
           scores + pair * beam, scratch);
    }
  }, num_threads);
}

}  // namespace pyengine::core
