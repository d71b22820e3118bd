#pragma once
#include "../train/optimizers.hpp"
