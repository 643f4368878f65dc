// Error messages built without iostream number formatting.
//
// TORCH_CHECK formats its arguments with std::ostringstream in the calling library. On machines
// where PyTorch was built with a different toolchain than the extension (seen: a torch wheel
// built with gcc-toolset-13, the extension with Ubuntu's g++ 13), formatting an integer through
// iostreams in the extension crashed inside std::num_put. S2O_CHECK builds the message as a
// std::string (numbers via std::to_string) and hands TORCH_CHECK that one string.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace s2o {
namespace detail {

inline void append(std::string& s, const char* x) { s += x; }
inline void append(std::string& s, const std::string& x) { s += x; }
inline void append(std::string& s, bool x) { s += x ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
inline void append(std::string& s, T x) {
  s += std::to_string(x);
}
inline void append(std::string& s, double x) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%g", x);
  s += buffer;
}
inline void append(std::string& s, c10::IntArrayRef shape) {
  s += "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  s += "]";
}
inline void append(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
inline void append(std::string& s, const c10::Device& d) { s += d.str(); }
inline void append(std::string& s, c10::DeviceType t) { s += c10::DeviceTypeName(t, true); }

}  // namespace detail

template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

}  // namespace s2o

#define S2O_CHECK(cond, ...) TORCH_CHECK(cond, ::s2o::message(__VA_ARGS__))
