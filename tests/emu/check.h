// A tiny test harness for the emulator's C++ unit tests (no dependencies, no torch).
//   TEST(suite_name) { CHECK(cond); CHECK_EQ(a, b); CHECK_NEAR(a, b, tol); CHECK_THROWS(stmt, "substring"); }
// The binary runs every test whose name starts with one of its arguments (all without arguments),
// prints one line per failed check and exits non-zero if any failed.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace emu_test {

struct Test {
  const char* name;
  void (*body)();
};

inline std::vector<Test>& registry() {
  static std::vector<Test> tests;
  return tests;
}

inline int& failures() {
  static int count = 0;
  return count;
}

struct Register {
  Register(const char* name, void (*body)()) { registry().push_back({name, body}); }
};

template <typename T>
std::string show(const T& value) {
  std::ostringstream out;
  if constexpr (std::is_floating_point_v<T>) out.precision(9);
  out << value;
  return out.str();
}

inline void report(const char* file, int line, const std::string& what) {
  if (++failures() <= 50) std::printf("FAILED %s:%d: %s\n", file, line, what.c_str());
}

}  // namespace emu_test

#define TEST(name)                                                   \
  static void name();                                                \
  static ::emu_test::Register name##_registration(#name, &name);     \
  static void name()

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) ::emu_test::report(__FILE__, __LINE__, "CHECK(" #cond ")");          \
  } while (0)

#define CHECK_EQ(a, b)                                                                                      \
  do {                                                                                                      \
    const auto& check_a_ = (a);                                                                             \
    const auto& check_b_ = (b);                                                                             \
    if (!(check_a_ == check_b_))                                                                            \
      ::emu_test::report(__FILE__, __LINE__,                                                                \
                         "CHECK_EQ(" #a ", " #b "): " + ::emu_test::show(check_a_) + " != " +              \
                             ::emu_test::show(check_b_));                                                   \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                                               \
  do {                                                                                                      \
    const double check_a_ = (a), check_b_ = (b);                                                            \
    if (!(std::fabs(check_a_ - check_b_) <= (tol)))                                                         \
      ::emu_test::report(__FILE__, __LINE__,                                                                \
                         "CHECK_NEAR(" #a ", " #b "): " + ::emu_test::show(check_a_) + " vs " +            \
                             ::emu_test::show(check_b_));                                                   \
  } while (0)

// The statement must throw a std::exception whose message contains every listed substring.
#define CHECK_THROWS(stmt, ...)                                                                             \
  do {                                                                                                      \
    std::string check_message_;                                                                             \
    bool check_threw_ = false;                                                                              \
    try {                                                                                                   \
      stmt;                                                                                                 \
    } catch (const std::exception& e) {                                                                     \
      check_threw_ = true;                                                                                  \
      check_message_ = e.what();                                                                            \
    }                                                                                                       \
    if (!check_threw_) {                                                                                    \
      ::emu_test::report(__FILE__, __LINE__, "CHECK_THROWS(" #stmt "): nothing thrown");                    \
    } else {                                                                                                \
      for (const char* check_part_ : {__VA_ARGS__}) {                                                       \
        if (check_message_.find(check_part_) == std::string::npos)                                          \
          ::emu_test::report(__FILE__, __LINE__,                                                            \
                             std::string("CHECK_THROWS: message lacks '") + check_part_ + "': " + check_message_); \
      }                                                                                                     \
      if (std::getenv("EMU_TEST_VERBOSE")) std::printf("  error text: %s\n", check_message_.c_str());     \
    }                                                                                                       \
  } while (0)
