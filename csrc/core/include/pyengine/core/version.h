#pragma once

namespace pyengine::core {
// Bumped whenever a kernel's contract changes.
inline constexpr int kCoreAbiVersion = 1;
}  // namespace pyengine::core
