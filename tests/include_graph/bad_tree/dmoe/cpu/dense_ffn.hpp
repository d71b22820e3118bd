#pragma once
#include "tasks.hpp"
